"""The engine's parts apart from the model: the scheduler as a pure function, the typed plan and its wire
format, the output processor's stop rules, and adapter operations that report their failure."""

from __future__ import annotations

import threading
import time
import types

import pytest
from kaito.runtime.plan import PLAN_VERSION, AdapterOp, PlanVersionError, PrefillRow, StepPlan, prefill_plan
from kaito.runtime.scheduler import Scheduler, chunks, fill_holes
from kaito.runtime.sequence import NeverFits


def row(prompt_len=4, pending=None, finished=None, cancelled=False, lora=()):
    """What the scheduler reads of a sequence; no torch, no model."""
    return types.SimpleNamespace(prompt_ids=[1] * prompt_len, pending=pending, finish_reason=finished,
                                 cancelled=cancelled, lora=lora)


def scheduler(**kw) -> Scheduler:
    args = dict(max_batch_size=4, max_waiting=2, max_prefill_tokens=64, prefill_chunk_tokens=32, prefill_step_ratio=1.0)
    return Scheduler(**{**args, **kw})


# ---- the plan and its wire format --------------------------------------------------------------------------

def test_a_plan_survives_its_wire_format_field_for_field():
    plan = StepPlan(keep=(2, 0), decode=(17, 4), prefill=(PrefillRow((1, 2, 3), (("alpha", 0.5), ("beta", 2.0))),),
                    ops=(AdapterOp("load", "alpha", "/mnt/adapter/alpha"), AdapterOp("unload", "beta")),
                    probe=((7,),), after_fault=True, error="boom")
    back = StepPlan.from_json(plan.to_json())
    assert back == plan and back.version == PLAN_VERSION
    assert back.prompts == [[1, 2, 3]] and back.loras == [(("alpha", 0.5), ("beta", 2.0))]
    assert b"pickle" not in plan.to_json() and plan.to_json().startswith(b"{")
    for simple in (StepPlan(noop=True), StepPlan(stop=True), prefill_plan(3, [([5, 6], ())])):
        assert StepPlan.from_json(simple.to_json()) == simple
    assert prefill_plan(3, [([5, 6], ())]).keep == (0, 1, 2)
    with pytest.raises(AttributeError):  # frozen: what was broadcast is what runs
        plan.keep = ()


def test_a_plan_of_another_version_is_refused_with_both_versions():
    raw = StepPlan(decode=(1,)).to_json().replace(f'"version":{PLAN_VERSION}'.encode(), b'"version":99')
    want = rf"version 99, this rank replays version {PLAN_VERSION}: every rank must run the same kaito image"
    with pytest.raises(PlanVersionError, match=want):
        StepPlan.from_json(raw)
    with pytest.raises(PlanVersionError, match="version None"):  # the dict plans of older builds
        StepPlan.from_json(b'{"keep": [], "decode": [], "prefill": []}')


# ---- the scheduler as a pure function ------------------------------------------------------------------------

def test_evictions_fill_holes_abort_cancelled_rows_and_decode_the_rest():
    running = [row(pending=10), row(pending=11, finished="stop"), row(pending=12, cancelled=True), row(pending=13),
               row(pending=14)]
    ev = scheduler().evictions(running, batch_size=5)
    assert ev.keep == [0, 3, 4] and ev.aborted == [2]  # the last survivors fill the holes
    assert ev.plan == StepPlan(keep=(0, 3, 4), decode=(10, 13, 14))
    # Nothing to run at all: no plan, so no forward and (under torchrun) no broadcast.
    assert scheduler().evictions([], batch_size=0).plan is None
    # Every row finished: the plan only evicts them.
    ev = scheduler().evictions([row(finished="length"), row(finished="stop")], batch_size=2)
    assert ev.plan == StepPlan(keep=(), decode=()) and ev.aborted == []
    # A cancelled row that finished in the same step is not aborted twice.
    assert scheduler().evictions([row(finished="stop", cancelled=True)], batch_size=1).aborted == []
    # A running row without its next token is the engine's bug: named, not a None sent to the executor.
    with pytest.raises(RuntimeError, match="a running row has no sampled token"):
        scheduler().evictions([row(pending=None)], batch_size=1)


def test_admissions_respect_rows_tokens_and_the_time_budget_in_arrival_order():
    s = scheduler()
    waiting = [row(10), row(20), row(200), row(5)]
    assert s.admissions(waiting, max_rows=4, max_tokens=64) == 2  # the 200-token prompt waits, and so does the 5
    assert s.admissions(waiting, max_rows=1, max_tokens=64) == 1
    assert s.admissions([row(300)], max_rows=4, max_tokens=64) == 1  # the first is taken regardless
    assert s.admissions([row(300)], max_rows=4, max_tokens=64, first=False) == 0
    assert s.admissions([], max_rows=4, max_tokens=64) == 0
    s.learn_prefill(100, 1.0)  # 10 ms per prompt token
    assert s.prefill_s_per_token == pytest.approx(0.01)
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.25) == 1  # 0.1 s, then 0.2 s > 0.15 s left
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.0) == 1
    # The first free_tokens do not count against the time: a step always prefills one chunk.
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.0, free_tokens=30) == 2
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.0, free_tokens=29) == 1
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.05, free_tokens=10) == 1  # 20 tokens: 0.2 s
    assert s.admissions(waiting, max_rows=4, max_tokens=64, time_left=0.25, free_tokens=10) == 2
    assert s.admissions(waiting, max_rows=4, max_tokens=20, time_left=0.0, free_tokens=100) == 1  # tokens still bound
    s.learn_prefill(100, 2.0)
    assert s.prefill_s_per_token == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)


def test_budgets_chunks_and_queue_limits():
    s = scheduler(prefill_step_ratio=0.5)
    assert s.inline_budget(None) == (64, None, 0)  # nothing decoded: no time bound
    assert s.inline_budget(0.2) == (64, pytest.approx(0.1), 32)  # and one chunk whatever the time
    assert scheduler(prefill_step_ratio=0).inline_budget(0.2) == (64, None, 0)
    assert s.apart_budget(room=3) == (3, 32)  # arrivals share a forward, whether or not the batch decodes
    rows = [row(10), row(16), row(40), row(1)]
    assert [len(c) for c in s.chunks(rows)] == [2, 1, 1] and s.chunks(rows)[0] == rows[:2]
    # Counted with padding: a long prompt does not gather short ones into a forward of rows x longest.
    assert chunks([100, 4, 4, 4], 128) == [1, 3] and chunks([4, 4, 4, 100], 128) == [3, 1]
    assert chunks([18] * 32, 128) == [7, 7, 7, 7, 4] and fill_holes([True, False, True, True]) == [0, 3, 2]
    assert s.room(busy=3) == 1
    assert s.accepts(waiting=0, new=6, busy=0) and not s.accepts(waiting=0, new=7, busy=0)
    assert s.accepts(waiting=2, new=0, busy=4) and not s.accepts(waiting=2, new=1, busy=4)
    s.check_fits(6)
    with pytest.raises(NeverFits, match=r"needs 7 sequences .* max_batch_size \+ max_waiting = 4 \+ 2"):
        s.check_fits(7)


# ---- the output processor ---------------------------------------------------------------------------------------

class _CharTok:
    """Token i is chr(i); skip_special_tokens drops token 0."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def _seq(max_tokens=10, stop=(), ignore_eos=False, prompt_len=2):
    from kaito.runtime.sampling import SamplingParams
    from kaito.runtime.sequence import Sequence

    return Sequence([1] * prompt_len, SamplingParams(max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos))


def _feed(out, s, text: str) -> list:
    outbox: list = []
    for ch in text:
        if s.finish_reason is None:
            out.append([s], [ord(ch) if ch != "\0" else 0], [None], outbox)
    events = []
    while not s.events.empty():
        events.append(s.events.get_nowait()[1])
    return events


def test_the_output_processor_stops_on_eos_stop_strings_max_tokens_and_context():
    from kaito.runtime.output import OutputProcessor
    from kaito.runtime.sequence import Finished

    out = OutputProcessor(_CharTok(), eos_ids=[0], max_model_len=8)
    s = _seq(stop=["cd"])
    events = _feed(out, s, "abcdef")
    assert s.finish_reason == "stop" and s.text == "ab" and s.output_ids == [97, 98, 99, 100]
    assert "".join(e.text for e in events[:-1]) == "ab" and isinstance(events[-1], Finished)
    s = _seq()
    _feed(out, s, "xy\0z")
    assert (s.finish_reason, s.text, len(s.output_ids)) == ("stop", "xy", 3)
    s = _seq(ignore_eos=True, max_tokens=3)
    _feed(out, s, "x\0yz")
    assert (s.finish_reason, s.text) == ("length", "xy")
    s = _seq(max_tokens=100, prompt_len=5)  # 5 prompt + 3 generated = the context of 8
    events = _feed(out, s, "abcdef")
    assert (s.finish_reason, s.text, events[-1].completion_tokens) == ("length", "abc", 3)


def test_the_completion_keeps_the_space_it_has_after_the_prompt():
    """As vLLM: the detokenizer reads the prompt's last tokens first, so prompt + completion reads right
    (a word-level tokenizer joins words with spaces: the first word's text is " world", not "world")."""
    from kaito.runtime.output import OutputProcessor
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "Hello", "big", "world", "again", "and"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = OutputProcessor(tok, eos_ids=[0], max_model_len=64)
    for prompt in ([1], [1, 2], [5, 2, 5, 2, 5, 2, 1, 2]):  # shorter and longer than the prompt context
        s = _seq(max_tokens=3)
        s.prompt_ids = list(prompt)
        events = _feed(out, s, "\3\4\5")
        assert s.text == " world again and" and "".join(e.text for e in events[:-1]) == s.text
        assert tok.decode(prompt) + s.text == tok.decode(prompt + s.output_ids)


def test_torch_threads_default_to_every_core_on_small_cpus_and_leave_one_from_four_up():
    from kaito.runtime.serving import default_torch_threads, usable_cores
    from kaito.runtime.settings import RuntimeSettings

    cpu = RuntimeSettings(device="cpu")
    assert [default_torch_threads(cpu, {}, cores=n) for n in (1, 2, 3, 4, 16)] == [1, 2, 3, 3, 15]
    assert default_torch_threads(cpu, {}) == default_torch_threads(cpu, {}, cores=usable_cores())
    assert [default_torch_threads(cpu, {"LOCAL_WORLD_SIZE": "2"}, cores=n) for n in (1, 2, 4, 16)] == [1, 1, 2, 7]
    assert default_torch_threads(RuntimeSettings(device="cpu", torch_threads=3), {}) is None  # chosen: kept
    assert default_torch_threads(cpu, {"OMP_NUM_THREADS": "4"}) is None


# ---- adapter operations report their failure -------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from kaito.runtime.loader import load
    from kaito.runtime.settings import RuntimeSettings

    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))


def _engine(loaded):
    from kaito.runtime.engine import Engine
    from kaito.runtime.executor import BatchExecutor

    return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                  max_model_len=loaded.max_model_len)


def test_an_adapter_op_the_engine_does_not_take_in_time_is_withdrawn_and_raises(loaded, monkeypatch):
    from kaito.runtime import engine as engine_mod
    from kaito.runtime.sampling import SamplingParams
    from kaito.runtime.sequence import Sequence

    monkeypatch.setattr(engine_mod, "OP_TIMEOUT_S", 0.3)
    e = _engine(loaded)
    busy, release = threading.Event(), threading.Event()

    def slow(kind, rows):  # the engine thread is stuck in a forward meanwhile
        busy.set()
        release.wait(10)
    e.fault_hook = slow
    e.start()
    try:
        s = Sequence(loaded.tokenizer("hi")["input_ids"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        e.submit([s])
        assert busy.wait(10)
        adapter = types.SimpleNamespace(name="late", path="/nowhere", weights={})
        with pytest.raises(RuntimeError, match="did not run it within 0.3 s; nothing changed"):
            e.add_adapter(adapter)
        release.set()
        e.fault_hook = None
        deadline = time.time() + 20
        while s.finish_reason is None and time.time() < deadline:
            time.sleep(0.01)
        assert s.finish_reason == "length" and "late" not in e.ex.lora.adapters  # withdrawn: never applied later
    finally:
        release.set()
        e.stop()


def test_an_adapter_op_on_a_stopped_engine_raises_and_changes_nothing(loaded):
    from kaito.runtime.sequence import EngineDead

    e = _engine(loaded)
    e.start()
    e.remove_adapter("nothing-here")  # a working op returns
    e.stop()
    with pytest.raises(EngineDead, match="adapter load of late: the engine is stopped"):
        e.add_adapter(types.SimpleNamespace(name="late", path="/nowhere", weights={}))
    assert "late" not in e.ex.lora.adapters
    dead = _engine(loaded)
    dead.error = RuntimeError("CUDA error: gone")
    with pytest.raises(EngineDead, match="CUDA error"):
        dead.remove_adapter("x")


def test_the_scheduler_plan_and_output_processor_import_without_torch():
    """The engine core's decisions stay torch-free, so they can move to another process or be tested alone."""
    import subprocess
    import sys

    code = ("import sys, kaito.runtime.scheduler, kaito.runtime.plan, kaito.runtime.output, kaito.runtime.sequence; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_worker_that_receives_another_plan_version_exits_naming_both(tiny_model_dir, monkeypatch):
    """worker_loop (a torchrun worker rank) stops with one line, not a traceback, on a plan from another build."""
    import torch.distributed as dist
    from kaito.runtime import distributed
    from kaito.runtime.settings import RuntimeSettings

    monkeypatch.setenv("KAITO_WORKER_HEALTH", "0")
    newer = StepPlan(decode=(1,)).to_json().replace(f'"version":{PLAN_VERSION}'.encode(), b'"version":2')
    monkeypatch.setattr(distributed, "receive_plan", lambda: StepPlan.from_json(newer))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit, match=rf"rank 0: received an engine plan of version 2, this rank replays version {PLAN_VERSION}"):
            distributed.worker_loop(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))
    finally:
        dist.destroy_process_group()


def test_a_worker_exits_non_zero_when_rank_0_stops_with_an_error_even_without_a_message(tiny_model_dir, monkeypatch):
    """A stop plan carrying rank 0's error ends the worker with it; an empty message is still an error."""
    import torch.distributed as dist
    from kaito.runtime import distributed
    from kaito.runtime.settings import RuntimeSettings

    monkeypatch.setenv("KAITO_WORKER_HEALTH", "0")
    settings = RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for error, want in (("", "no message; see its log"), ("boom", "boom")):
            monkeypatch.setattr(distributed, "receive_plan", lambda e=error: StepPlan(stop=True, error=e))
            with pytest.raises(SystemExit, match=f"rank 0 stopped after an error: {want}"):
                distributed.worker_loop(settings)
        monkeypatch.setattr(distributed, "receive_plan", lambda: StepPlan(stop=True))
        distributed.worker_loop(settings)  # a clean stop returns (exit 0)
    finally:
        dist.destroy_process_group()
