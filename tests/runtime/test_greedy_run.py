"""Greedy runs: several decode steps in one C call (`kaito_decode_run`), each row's argmax fed back as its next token.

Token-equal to transformers' greedy decode on every architecture the C step serves, stopped by EOS, the time
budget and the interrupt flag exactly where they say, refused wherever one call could differ from step-by-step
decoding; and through the engine the same tokens and finish reasons as one step at a time, for every way a row
ends, with any arrival, cancellation or adapter change ending a run and a failing run contained as a decode is."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch
from kaito.runtime import cglue, cstep
from kaito.runtime.engine import Engine, Sequence, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.settings import RuntimeSettings

from .test_cglue import _hf_greedy, _model

PROMPTS = [[3, 17, 29, 4, 90, 11], [5, 8], [7, 140, 2, 66], [9], [12, 13, 14, 15, 16, 17, 18, 19]]


class _Runs:
    """Stands in for the step's CpuGlue and records the k and the steps of each run."""

    def __init__(self, glue: cglue.CpuGlue):
        self.glue, self.runs = glue, []

    def __getattr__(self, name):
        return getattr(self.glue, name)

    def decode_run(self, *a):
        done = self.glue.decode_run(*a)
        self.runs.append((a[19].shape[0] - 1, done))  # tokens [k + 1, n]
        return done


def _recording(ex: BatchExecutor) -> _Runs:
    assert ex.fast is not None and ex.fast.step is not None
    rec = _Runs(ex.fast.step.glue)
    ex.fast.step.glue = rec  # type: ignore[assignment]
    return rec


def _run_greedy(ex: BatchExecutor, batch: list[list[int]], n: int, k: int) -> list[list[int]]:
    """Prefill, then runs of up to k steps until every row has n tokens; the rows' tokens."""
    flag = ctypes.c_int(0)
    got = [[int(t)] for t in ex.prefill(batch, [()] * len(batch)).argmax(-1)]
    while len(got[0]) < n:
        picks = ex.greedy_run([g[-1] for g in got], min(k, n - len(got[0])), [], [False] * len(got), 60.0, flag)
        assert picks is not None, "the executor refused a greedy run on dense hook-free weights"
        for step in picks:
            for g, t in zip(got, step):
                g.append(t)
    ex.evict([])
    return got


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2", "mistral"])
def test_greedy_runs_are_token_equal_to_transformers_greedy(glue, arch):
    """One row alone, then five left-padded rows (the run's mask), in runs of 5 and of 13 steps: every row's
    tokens are transformers' greedy tokens; partial rotary (Phi-3), GQA, multi-query with qkv bias (Qwen2)."""
    model = _model(arch)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 2.0)
    want = [_hf_greedy(model, p, 27) for p in PROMPTS]
    ex = BatchExecutor(model)
    rec = _recording(ex)
    for k in (5, 13):
        for batch in ([PROMPTS[0]], PROMPTS):
            assert _run_greedy(ex, batch, 27, k) == want[:len(batch)], f"{arch}: a run diverged (k={k})"
    assert rec.runs and all(done == want_k for want_k, done in rec.runs), rec.runs  # no run ended early
    assert {k for k, _ in rec.runs} >= {5, 13}


def test_a_run_stops_after_eos_on_interrupt_and_at_its_budget_and_the_batch_goes_on(glue):
    model = _model("llama")
    want = [_hf_greedy(model, p, 20) for p in PROMPTS[:3]]
    ex = BatchExecutor(model)
    flag = ctypes.c_int(0)

    def start() -> list[list[int]]:
        ex.evict([])
        return [[int(t)] for t in ex.prefill(PROMPTS[:3], [()] * 3).argmax(-1)]

    def run(got, k, eos=(), stops=(False, False, False), budget=60.0):
        picks = ex.greedy_run([g[-1] for g in got], k, list(eos), list(stops), budget, flag)
        assert picks is not None
        for step in picks:
            for g, t in zip(got, step):
                g.append(t)
        return len(picks)

    # Row 1's 6th token as EOS: the run ends after the step that picked it, only for a row that stops at EOS.
    eos = want[1][5]
    first = min(i for i in range(1, 20) if eos in (want[0][i], want[1][i], want[2][i]))
    got = start()
    assert run(got, 15, [eos], (False, True, False)) == min(i for i in range(1, 20) if want[1][i] == eos)
    got = start()
    assert run(got, 15, [eos], (True, True, True)) == first
    assert run(got, 19 - first) == 19 - first  # the batch goes on from where the run stopped, token-equal
    assert got == want
    got = start()
    assert run(got, 15, [eos], (False, False, False)) == 15
    # Interrupted before it starts, or a budget spent by one step: exactly one step, then on as before.
    got = start()
    flag.value = 1
    assert run(got, 15) == 1
    flag.value = 0
    assert run(got, 15, budget=0.0) == 1
    assert run(got, 17) == 17 and got == want


def test_runs_are_refused_where_one_call_could_differ_from_step_by_step(glue):
    import transformers as tr

    # RoPE that rescales by the longest position of a call: only under the original length.
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    dyn = tr.LlamaForCausalLM(tr.LlamaConfig(max_position_embeddings=64, **common,
                                             rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    assert cstep.rope_batchable(dyn.model.rotary_emb, 63) and not cstep.rope_batchable(dyn.model.rotary_emb, 64)
    long = tr.Phi3ForCausalLM(tr.Phi3Config(max_position_embeddings=128, original_max_position_embeddings=32,
                                            pad_token_id=0, **common, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 32,
        "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}))
    assert cstep.rope_batchable(long.model.rotary_emb, 31) and not cstep.rope_batchable(long.model.rotary_emb, 40)
    assert cstep.rope_batchable(_model("phi3").model.rotary_emb, 10_000)

    flag = ctypes.c_int(0)
    model = _model("phi3")
    ex = BatchExecutor(model)
    ex.prefill([[3, 17, 29]], [()])
    # A hook (an adapter load, a quantization wrapper) the C step would not run.
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: out + 1.0)
    assert ex.greedy_run([5], 4, [], [False], 60.0, flag) is None
    handle.remove()
    # An embedding that renormalises rows on lookup.
    model.model.embed_tokens.max_norm = 1.0
    assert ex.greedy_run([5], 4, [], [False], 60.0, flag) is None
    model.model.embed_tokens.max_norm = None
    # A row on an adapter.
    ex.rows = [(("alpha", 1.0),)]
    assert ex.greedy_run([5], 4, [], [False], 60.0, flag) is None
    ex.rows = [()]
    # Refusals changed nothing: the row decodes on as if they never happened.
    assert ex.width == 3 and len(ex.greedy_run([5], 4, [], [False], 60.0, flag)) == 4
    assert ex.width == 7


# ---- through the engine -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _dense_weights(monkeypatch):
    """Dense weights from the first step (KAITO_PACKED_LINEARS=0, read when an executor's fast path is built):
    a server's layout switch gets there after a run of short steps."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    """The tiny preset model, never packed in this module."""
    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))


def _engine(loaded, runs: bool, **kw) -> Engine:
    return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                  max_model_len=loaded.max_model_len, decode_run_s=60.0 if runs else 0.0, **kw)


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text)["input_ids"]


TEXTS = ["What is a GPU?", "Explain batching in one sentence. In short,", "hi", "Numbers 0 1 2 3"]


def _mix(loaded, eos: int, stop: str) -> list[Sequence]:
    """Rows that end every way a row can: length at different counts, EOS (and EOS ignored), a stop string,
    min_tokens holding EOS back."""
    greedy = lambda **kw: SamplingParams(temperature=0.0, **{"max_tokens": 40, **kw})
    return [
        Sequence(_ids(loaded, TEXTS[0]), greedy(max_tokens=37, ignore_eos=True)),
        Sequence(_ids(loaded, TEXTS[1]), greedy()),
        Sequence(_ids(loaded, TEXTS[2]), greedy(ignore_eos=True)),
        Sequence(_ids(loaded, TEXTS[3]), greedy(min_tokens=6)),
        Sequence(_ids(loaded, TEXTS[0]), greedy(stop=[stop])),
        Sequence(_ids(loaded, TEXTS[1]), greedy(max_tokens=3)),
    ]


def test_the_engine_with_runs_gives_the_tokens_and_endings_of_one_step_at_a_time(dense, monkeypatch):
    """Same outputs, texts and finish reasons with runs as without, for a batch whose rows end every way (EOS
    made a token the greedy streams pick, so it fires mid-run); with runs the engine took far fewer steps. A
    row that samples (seeded) joins: no run while it is in the batch, and its tokens are the same too."""
    probes = [Sequence(_ids(dense, t), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)) for t in TEXTS]
    run_to_completion(_engine(dense, False, max_batch_size=8), probes)
    out = probes[1].output_ids
    # A token a row that stops at EOS really picks, mid-way, for the first time there.
    eos = next(t for i, t in enumerate(out) if i >= 8 and t not in out[:i])
    stop = dense.tokenizer.decode([probes[0].output_ids[13]]).strip()
    assert stop
    results, steps, ran = [], [], []
    for runs in (False, True):
        e = _engine(dense, runs, max_batch_size=8)
        e.eos_ids = [eos]
        rec = _recording(e.ex)
        seqs = _mix(dense, eos, stop)
        e.submit(seqs[:4])
        e.step()
        e.submit(seqs[4:])  # joins mid-way, beside rows that are running
        run_to_completion(e, [])
        while any(s.finish_reason is None for s in seqs):
            e.step()
        sampled = Sequence(_ids(dense, "hi"), SamplingParams(max_tokens=20, temperature=0.9, seed=7))
        beside = Sequence(_ids(dense, "What is a GPU?"), SamplingParams(max_tokens=20, temperature=0.0))
        before = len(rec.runs)
        run_to_completion(e, [sampled, beside])
        assert len(rec.runs) == before, "a greedy run ran while a sampling row was in the batch"
        seqs += [sampled, beside]
        results.append([(s.output_ids, s.text, s.finish_reason) for s in seqs])
        steps.append(e.steps)
        ran.append(rec.runs)
    assert results[0] == results[1]
    reasons = {r for _, _, r in results[0]}
    assert reasons == {"length", "stop"}, reasons
    assert not ran[0] and ran[1], "runs off ran some, or runs on ran none"
    assert any(done < k for k, done in ran[1]), (ran[1], results[1])
    assert steps[1] * 2 < steps[0], steps


def test_arrivals_cancellations_and_adapter_changes_end_a_run(dense):
    """Each sets the flag the C loop reads between steps (a run then ends after its current step)."""
    e = _engine(dense, True)
    seq = Sequence(_ids(dense, "hi"), SamplingParams(max_tokens=5, temperature=0.0))
    e.runs.flag.value = 0
    e.submit([seq])
    assert e.runs.flag.value == 1
    e.step()
    e.runs.flag.value = 0
    e.cancel([seq])
    assert e.runs.flag.value == 1
    e.step()
    assert seq.finish_reason == "abort"
    e.start()
    try:
        e.runs.flag.value = 0
        e.remove_adapter("nope")  # taken by the engine thread (nothing is running, so no step clears the flag)
        assert e.runs.flag.value == 1
        e.runs.flag.value = 0
    finally:
        e.stop()
    assert e.runs.flag.value == 1


def test_a_failing_run_is_contained_like_a_decode(dense, monkeypatch):
    """The run raises (here: the executor's greedy run itself, then a row whose forward fails): the step falls
    back to one decode, where the fault is contained row by row: the bad row fails alone, the others finish
    with the tokens they would have had."""
    texts, lengths = ["What is a GPU?", "hi", "Numbers 0 1 2 3"], [30, 12, 20]  # rows evicted while others go on
    want = []
    for t, n in zip(texts, lengths):
        s = Sequence(_ids(dense, t), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        run_to_completion(_engine(dense, False), [s])
        want.append(s.output_ids)
    e = _engine(dense, True, max_batch_size=8)
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise MemoryError("injected: no memory for the run's buffers")
    monkeypatch.setattr(e.ex, "greedy_run", broken)
    seqs = [Sequence(_ids(dense, t), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for t, n in zip(texts, lengths)]
    run_to_completion(e, seqs)
    assert calls and [s.output_ids for s in seqs] == want
    monkeypatch.undo()

    e = _engine(dense, True, max_batch_size=8)
    good = [Sequence(_ids(dense, t), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for t, n in zip(texts, lengths)]
    bad = Sequence(_ids(dense, "a bad request"), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))

    def hook(kind, rows):
        if kind == "decode" and any(r is bad for r in rows):
            raise RuntimeError("injected: this row breaks the forward")
    e.fault_hook = hook
    run_to_completion(e, good[:2] + [bad] + good[2:])
    assert bad.finish_reason == "error" and e.error is None
    assert [s.output_ids for s in good] == want and all(s.finish_reason == "length" for s in good)


def test_a_run_is_offered_only_to_plain_greedy_rows_and_never_past_a_rows_limit():
    from kaito.runtime.greedy_runs import MAX_STEPS, GreedyRuns
    from kaito.runtime.plan import StepPlan

    runs = GreedyRuns(0.05, max_model_len=100)
    plain = lambda **kw: Sequence([1] * 10, SamplingParams(**{"temperature": 0.0, "max_tokens": 500, **kw}))
    rows = [plain(), plain(max_tokens=30)]
    rows[1].output_ids = [5] * 20
    plan = StepPlan(keep=(0, 1), decode=(7, 8))
    assert runs.steps(plan, rows, [3], idle=True, one_process=True) == 10  # row 1 may take 10 more tokens
    rows[0].output_ids = [5] * 85  # the context (100) leaves row 0 five
    assert runs.steps(plan, rows, [3], idle=True, one_process=True) == 5
    rows[0].output_ids = []
    rows[1].output_ids = []
    assert runs.steps(plan, rows, [3], idle=True, one_process=True) == 30
    assert runs.steps(plan, [plain(), plain()], [3], idle=True, one_process=True) == MAX_STEPS
    runs.flag.value = 1
    assert runs.steps(plan, rows, [3], idle=False, one_process=True) == 0 and runs.flag.value == 0
    assert runs.steps(plan, rows, [3], idle=True, one_process=False) == 0  # torchrun: workers replay plans
    assert runs.steps(StepPlan(keep=(0, 1), decode=(7,)), rows, [3], idle=True, one_process=True) == 0
    assert GreedyRuns(0.0, 100).steps(plan, rows, [3], idle=True, one_process=True) == 0
    for odd in (dict(temperature=0.7), dict(logprobs=2), dict(repetition_penalty=1.2), dict(min_tokens=5),
                dict(logits_processors=[lambda ids, row: None])):
        assert runs.steps(plan, [plain(), plain(**odd)], [3], idle=True, one_process=True) == 0, odd
    on_adapter = plain()
    on_adapter.lora = (("alpha", 1.0),)
    assert runs.steps(plan, [plain(), on_adapter], [3], idle=True, one_process=True) == 0
    almost = plain(max_tokens=21)
    almost.output_ids = [5] * 20
    assert runs.steps(plan, [plain(), almost], [3], idle=True, one_process=True) == 0  # one token left: one step


def test_the_streamer_sends_finished_steps_only_in_order_and_nothing_after_the_run():
    """A stand-in for the C loop (our own boundary: a thread writing the picks tensor step by step, a row's
    entries one at a time) against the real streamer thread: each delivery holds only whole steps, in order,
    none twice; `end` returns how many went out and nothing is delivered after it."""
    from kaito.runtime.greedy_runs import RunStreamer, finished_steps

    k, n = 12, 3
    picks = torch.full((k + 1, n), -1, dtype=torch.long)
    picks[0] = torch.tensor([1, 2, 3])
    got: list[list[int]] = []
    streamer = RunStreamer(0.002)
    streamer.begin(picks, got.extend)
    for j in range(1, 9):  # the loop writes 8 of its 12 steps, a row entry by entry
        for r in range(n):
            picks[j, r] = 100 * j + r
            time.sleep(0.003)
        assert all(len(row) == n and -1 not in row for row in got)
    time.sleep(0.02)
    sent = streamer.end()
    assert 1 <= sent <= 8 and got == [[100 * j + r for r in range(n)] for j in range(1, sent + 1)]
    picks[9] = torch.tensor([900, 901, 902])  # written after end: never sent
    time.sleep(0.02)
    assert len(got) == sent
    assert finished_steps(picks, 0) == 9 and finished_steps(picks, 9) == 0 and finished_steps(picks, k) == 0


def test_a_runs_tokens_stream_while_it_goes_on(small_model_dir, monkeypatch):
    """Runs 2 s long at most, their tokens due every 2 ms: the streamer sends most of them while the C loop is
    still going (on its own thread), and the tokens, texts and endings are one step at a time's (a stop string
    hit mid-run ends that row there and interrupts the run)."""
    monkeypatch.setenv("KAITO_PACKED_LINEARS", "0")  # dense from the first step: runs from the first token
    loaded = load(RuntimeSettings(model_dir=small_model_dir, preset="tiny-phi-3-small"))
    rows = lambda **kw: [Sequence(_ids(loaded, t), SamplingParams(max_tokens=150, temperature=0.0, **kw))
                         for t in (TEXTS[0], TEXTS[1], "the cat sat on the mat and")]
    probe = rows(ignore_eos=True)
    run_to_completion(Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                             max_model_len=loaded.max_model_len), probe)
    out = probe[2].output_ids
    # A stop string the row's text first holds some tokens in (its text's tail there, absent a token before).
    text = lambda i: loaded.tokenizer.decode(out[:i])
    stop = next(text(i)[-3:] for i in range(12, 140) if len(text(i)) >= 3 and text(i)[-3:] not in text(i - 1))
    results, streamed = [], []
    for every_s in (0.0, 0.002):
        e = Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                   max_model_len=loaded.max_model_len, decode_run_s=every_s)
        seqs = rows(ignore_eos=True)[:2] + rows(ignore_eos=True, stop=[stop])[2:]
        threads: set[str] = set()
        append = e.output.append

        def watched(*a, _seen=threads, _append=append, **kw):
            _seen.add(threading.current_thread().name)
            return _append(*a, **kw)
        e.output.append = watched  # type: ignore[method-assign]
        steps_sent = 0
        e.submit(seqs)
        while any(s.finish_reason is None for s in seqs):
            e.step()
            steps_sent += e.runs.streamed
            e.runs.streamed = 0
        results.append([(s.output_ids, s.text, s.finish_reason) for s in seqs])
        streamed.append((steps_sent, threads))
    assert results[0] == results[1]
    assert results[1][2][2] == "stop" and len(results[1][2][0]) < 150
    assert streamed[0][0] == 0
    assert streamed[1][0] >= 50 and "kaito-run-streamer" in streamed[1][1], streamed


def test_a_run_failing_after_it_streamed_fails_its_rows_and_the_engine_goes_on(dense, monkeypatch):
    """Tokens already streamed cannot be taken back, so a run that raises after sending some must not fall back
    to decoding that step again (its rows would get a token twice): those rows fail, each token sent once, and
    the next request decodes as it would have."""
    want = Sequence(_ids(dense, "hi"), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    run_to_completion(_engine(dense, False), [want])
    e = Engine(BatchExecutor(dense.model), dense.tokenizer, eos_ids=dense.eos_ids,
               max_model_len=dense.max_model_len, decode_run_s=0.001)
    real = e.ex.greedy_run

    def sends_then_breaks(tokens, k, eos_ids, stops, budget_s, flag, watch=None):
        picks = torch.full((k + 1, len(tokens)), -1, dtype=torch.long)
        watch(picks)
        picks[1:4] = 7  # three steps the streamer may send
        deadline = time.monotonic() + 5
        while e.runs.streamer._sent < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        raise RuntimeError("injected: the run broke after its loop wrote three steps")
    monkeypatch.setattr(e.ex, "greedy_run", sends_then_breaks)
    seq = Sequence(_ids(dense, "What is a GPU?"), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    run_to_completion(e, [seq])
    assert seq.finish_reason == "error" and seq.output_ids[1:] == [7, 7, 7], seq.output_ids
    monkeypatch.setattr(e.ex, "greedy_run", real)
    again = Sequence(_ids(dense, "hi"), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    run_to_completion(e, [again])
    assert again.output_ids == want.output_ids and again.finish_reason == "length"

    # The streamer's delivery itself raises (the output processor, on its thread): the run's rows fail too.
    append = e.output.append

    def breaks_on_the_streamer(*a, **kw):
        if threading.current_thread().name == "kaito-run-streamer":
            raise RuntimeError("injected: the output processor broke")
        return append(*a, **kw)

    def writes_and_returns(tokens, k, eos_ids, stops, budget_s, flag, watch=None):
        picks = torch.full((k + 1, len(tokens)), -1, dtype=torch.long)
        watch(picks)
        picks[1:3] = 7
        deadline = time.monotonic() + 5
        while e.runs.streamer.error is None and time.monotonic() < deadline:
            time.sleep(0.001)
        return picks[1:3].tolist()
    monkeypatch.setattr(e.output, "append", breaks_on_the_streamer)
    monkeypatch.setattr(e.ex, "greedy_run", writes_and_returns)
    seq = Sequence(_ids(dense, "What is a GPU?"), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    run_to_completion(e, [seq])
    assert seq.finish_reason == "error" and len(seq.output_ids) == 1 and e.error is None
    monkeypatch.undo()
    again = Sequence(_ids(dense, "hi"), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    run_to_completion(e, [again])
    assert again.output_ids == want.output_ids and again.finish_reason == "length"
