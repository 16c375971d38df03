"""Engine: continuous batching equivalence, sampling, stopping, cancellation (no HTTP)."""

from __future__ import annotations

import time
import types

import pytest
import torch
from kaito.runtime.engine import Engine, QueueFull, Sequence, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.settings import RuntimeSettings

PROMPTS = [
    "What is a GPU?",
    "Explain batching in one sentence. In short,",
    "hi",
    "The quick brown fox asked how a registry works; the answer:",
    "Question 3: why would a team use quantization?",
    "Numbers 0 1 2 3",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))


def engine(loaded, **kw) -> Engine:
    return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                  max_model_len=loaded.max_model_len, **kw)


def ids(loaded, text):
    return loaded.tokenizer(text)["input_ids"]


def hf_greedy(loaded, prompt_ids, n):
    """Reference: plain transformers forward with its own DynamicCache, argmax, EOS not special."""
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = loaded.model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


def test_greedy_in_full_batch_equals_alone_and_hf_generate(loaded):
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    alone = [run_to_completion(engine(loaded), [Sequence(ids(loaded, p), greedy(24))])[0][0] for p in PROMPTS]
    assert alone[0] == hf_greedy(loaded, ids(loaded, PROMPTS[0]), 24)
    e = engine(loaded, max_batch_size=4)
    seqs = [Sequence(ids(loaded, p), greedy(24 + 3 * i)) for i, p in enumerate(PROMPTS * 3)]
    # Staggered arrivals: some join while others are mid-decode, rows finish at different steps.
    e.submit(seqs[:2])
    e.step(), e.step(), e.step()
    e.submit(seqs[2:5])
    e.step()
    run_to_completion(e, seqs[5:])
    assert max(len(s.output_ids) for s in seqs) > 24
    for i, s in enumerate(seqs):
        assert s.output_ids[:24] == alone[i % len(PROMPTS)], f"row {i} diverged in the batch"
        assert s.finish_reason == "length" and len(s.output_ids) == 24 + 3 * i


def test_batch_width_is_reclaimed_after_evictions(loaded):
    e = engine(loaded)
    long_, short = Sequence(ids(loaded, PROMPTS[1] * 6), SamplingParams(max_tokens=2, temperature=0)), \
        Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    run_to_completion(e, [long_, short])
    e.step()  # evicts the finished rows
    assert e.ex.batch_size == 0 and e.num_running == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(loaded):
    p = lambda seed: SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
    a = run_to_completion(engine(loaded), [Sequence(ids(loaded, "hi"), p(7))])[0][0]
    e = engine(loaded)
    batch = [Sequence(ids(loaded, q), p(7 if q == "hi" else 100 + i)) for i, q in enumerate(PROMPTS)]
    run_to_completion(e, batch)
    assert batch[2].output_ids == a
    b = run_to_completion(engine(loaded), [Sequence(ids(loaded, "hi"), p(8))])[0][0]
    assert b != a


def test_top_k_one_equals_greedy_and_penalties_change_output(loaded):
    prompt = ids(loaded, PROMPTS[0])
    greedy = run_to_completion(engine(loaded), [Sequence(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])[0][0]
    topk1 = run_to_completion(engine(loaded), [Sequence(prompt, SamplingParams(max_tokens=30, temperature=1.0, top_k=1, ignore_eos=True))])[0][0]
    assert topk1 == greedy
    pen = run_to_completion(engine(loaded), [Sequence(prompt, SamplingParams(max_tokens=30, temperature=0, repetition_penalty=3.0, ignore_eos=True))])[0][0]
    pres = run_to_completion(engine(loaded), [Sequence(prompt, SamplingParams(max_tokens=30, temperature=0, presence_penalty=2.0, ignore_eos=True))])[0][0]
    assert pen != greedy and pres != greedy
    # A presence penalty of 2 on a near-uniform model forbids repeats: more distinct tokens than greedy.
    assert len(set(pres)) >= len(set(greedy))


def test_stop_string_truncates_and_is_not_emitted(loaded):
    prompt = ids(loaded, PROMPTS[3])
    full = run_to_completion(engine(loaded), [Sequence(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))])[0][1]
    assert len(full) > 10
    stop = full[6:9]
    seq = Sequence(prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop], ignore_eos=True))
    run_to_completion(engine(loaded), [seq])
    assert seq.finish_reason == "stop"
    assert seq.text == full[: full.index(stop)]
    streamed = []
    while not seq.events.empty():
        _, ev = seq.events.get_nowait()
        streamed.append(getattr(ev, "text", ""))
    assert "".join(streamed) == seq.text


def test_eos_stops_unless_ignored_and_min_tokens(loaded):
    # Force EOS: a logit bias through a huge repetition penalty is not enough, so find a prompt whose greedy
    # continuation contains EOS by scanning the eos ids' ranks is brittle; instead check min_tokens/ignore_eos
    # semantics directly on the sampler.
    from kaito.runtime.sampling import sample

    class S:
        def __init__(self, params, out=()):
            self.params, self.output_ids, self.prompt_ids, self.generator = params, list(out), [1], None

    logits = torch.zeros(2, 16)
    logits[:, 3] = 10.0  # EOS is the argmax
    toks, _ = sample(logits, [S(SamplingParams(temperature=0)), S(SamplingParams(temperature=0, min_tokens=2))], [3, 5])
    assert toks[0] == 3 and toks[1] not in (3, 5)
    # Through the engine (logits are inference tensors there): EOS masked until min_tokens.
    e = engine(loaded)
    e.eos_ids = list(range(0, 1000))  # nearly every token would end the sequence
    held = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=50, temperature=0, min_tokens=4))
    run_to_completion(e, [held])
    assert held.finish_reason == "stop" and len(held.output_ids) == 5
    # End to end: EOS from the model finishes with "stop" and does not count past it.
    e = engine(loaded)
    e.eos_ids = [e.eos_ids[0]] + list(range(10, 1000))  # make most tokens EOS for this engine
    seq = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=50, temperature=0))
    run_to_completion(e, [seq])
    assert seq.finish_reason == "stop" and len(seq.output_ids) < 50


def test_queue_full_and_cancel(loaded):
    e = engine(loaded, max_batch_size=1, max_waiting=1)
    a, b = (Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)) for _ in range(2))
    e.submit([a, b])  # one slot + one waiting
    with pytest.raises(QueueFull):
        e.submit([Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=5))])
    e.step()
    assert e.num_running == 1 and e.num_waiting == 1
    e.cancel([a, b])
    e.step()
    assert a.finish_reason == "abort" and b.finish_reason == "abort"
    assert e.num_running == 0 and e.num_waiting == 0 and e.ex.batch_size == 0
    assert len(a.output_ids) < 100


def test_logprobs_are_log_softmax_of_the_model(loaded):
    prompt = ids(loaded, "hi")
    seq = Sequence(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=3))
    run_to_completion(engine(loaded), [seq])
    _, tok = seq.events.get_nowait()
    with torch.no_grad():
        ref = loaded.model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    chosen, top = tok.logprob
    assert tok.token_id == int(ref.argmax())
    assert abs(chosen - float(ref.max())) < 1e-4
    assert [i for i, _ in top] == ref.topk(3).indices.tolist()


def test_long_generations_cross_kv_buffer_regrowth(loaded):
    from kaito.runtime.executor import HEADROOM

    n = 2 * HEADROOM + 20
    prompt = ids(loaded, PROMPTS[4])
    want = hf_greedy(loaded, prompt, n)
    e = engine(loaded)
    long_ = Sequence(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    shorts = [Sequence(ids(loaded, p), SamplingParams(max_tokens=5 + 40 * i, temperature=0, ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])]
    e.submit([long_] + shorts[:1])
    for _ in range(150):
        e.step()
    e.submit(shorts[1:])  # admitted mid-way: the batch is re-merged around the long row
    run_to_completion(e, [])
    while long_.finish_reason is None or any(s.finish_reason is None for s in shorts):
        e.step()
    assert long_.output_ids == want


def _wait(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_failing_forward_fails_its_row_and_the_engine_keeps_serving(loaded):
    e = engine(loaded)
    real, calls = None, {"n": 0}
    e.start()
    try:
        real = e.ex.decode

        def flaky(tokens):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated NaN")
            return real(tokens)

        e.ex.decode = flaky
        bad = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        e.submit([bad])
        assert _wait(lambda: bad.finish_reason is not None)
        assert bad.finish_reason == "error" and e.error is None and e.step_failures == 1
        good = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        e.submit([good])
        assert _wait(lambda: good.finish_reason is not None)
        assert good.finish_reason == "length" and len(good.output_ids) == 5
        # A failing prefill: the sequences being admitted get their Finished too (nobody hangs).
        real_prefill = e.ex.prefill
        e.ex.prefill = lambda prompts, rows: (_ for _ in ()).throw(RuntimeError("simulated prefill failure"))
        stuck = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=5, temperature=0))
        e.submit([stuck])
        assert _wait(lambda: stuck.finish_reason is not None)
        assert stuck.finish_reason == "error" and e.step_failures == 2
        e.ex.prefill = real_prefill
    finally:
        e.stop()


# ---- fault containment: one bad row never fails another request ------------------------------------------

def _hook_failing(bad: Sequence, kind: str, after_tokens: int = 0):
    """Fault injection at the engine's forward boundary: every forward of `kind` that includes `bad` raises
    (after it produced `after_tokens` tokens), as a row whose data breaks the model would."""
    def hook(k, rows):
        if k == kind and any(r is bad for r in rows) and len(bad.output_ids) >= after_tokens:
            raise RuntimeError("injected: this row breaks the forward")
    return hook


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("threaded", [False, True])
def test_one_bad_row_fails_alone_at_prefill_and_decode(loaded, kind, threaded):
    want = [run_to_completion(engine(loaded), [Sequence(ids(loaded, p), _greedy(12))])[0][0] for p in PROMPTS]
    e = engine(loaded, max_batch_size=8, prefill_thread=threaded)
    good = [Sequence(ids(loaded, p), _greedy(12)) for p in PROMPTS]
    bad = Sequence(ids(loaded, "a bad request"), _greedy(12))
    e.fault_hook = _hook_failing(bad, kind, after_tokens=3 if kind == "decode" else 0)
    batch = good[:3] + [bad] + good[3:]  # mixed into one prefill group with good requests
    if threaded:
        e.start()
        try:
            e.submit(batch)
            assert _wait(lambda: all(s.finish_reason is not None for s in batch), 60)
        finally:
            e.stop()
    else:
        run_to_completion(e, batch)
    assert bad.finish_reason == "error" and e.error is None
    if kind == "decode":
        assert len(bad.output_ids) == 3  # it ran until its forward started failing
    for s, w in zip(good, want):
        assert s.finish_reason == "length" and s.output_ids == w, "a good row changed because of the bad one"
    if not threaded:  # the engine goes on serving, with the same tokens as before
        again = Sequence(ids(loaded, PROMPTS[0]), _greedy(12))
        run_to_completion(e, [again])
        assert again.output_ids == want[0]


def test_a_device_fault_stops_the_engine_and_calls_on_fatal(loaded):
    e = engine(loaded, max_batch_size=4)
    fatal = []
    e.on_fatal = fatal.append
    a, b = Sequence(ids(loaded, "hi"), _greedy(50)), Sequence(ids(loaded, "What is a GPU?"), _greedy(50))
    e.fault_hook = lambda kind, rows: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access")) \
        if kind == "decode" and len(a.output_ids) >= 2 else None
    e.start()
    e.submit([a, b])
    assert _wait(lambda: e.error is not None)
    assert _wait(lambda: a.finish_reason == "error" and b.finish_reason == "error")
    assert len(fatal) == 1 and "CUDA error" in str(fatal[0])


def test_every_forward_failing_is_the_device_not_a_request(loaded, monkeypatch):
    # A row that fails alone triggers a one-token probe; when that fails too, the device is broken.
    e = engine(loaded)
    fatal = []
    e.on_fatal = fatal.append
    monkeypatch.setattr(e.ex, "prefill_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    s = Sequence(ids(loaded, "hi"), _greedy(5))
    e.start()
    e.submit([s])
    assert _wait(lambda: e.error is not None) and s.finish_reason == "error"
    assert fatal and "probe" in str(fatal[0])
    e.stop()


def test_requests_that_can_never_fit_are_refused_with_the_limit(loaded):
    from kaito.runtime.sequence import NeverFits

    e = engine(loaded, max_batch_size=4, max_waiting=4)
    with pytest.raises(NeverFits, match="empty"):
        e.submit([Sequence([], _greedy(3))])
    with pytest.raises(NeverFits, match=r"max_batch_size \+ max_waiting = 4 \+ 4"):
        e.submit([Sequence(ids(loaded, "hi"), _greedy(3)) for _ in range(9)])
    e.submit([Sequence(ids(loaded, "hi"), _greedy(3)) for _ in range(8)])  # fits: 4 run, 4 wait
    with pytest.raises(QueueFull):  # waiting would help: 429
        e.submit([Sequence(ids(loaded, "hi"), _greedy(3))])


def test_extreme_sampling_values_do_not_crash_the_batch(loaded):
    extreme = [dict(temperature=1e-40), dict(top_p=1e-46), dict(top_k=10**20), dict(repetition_penalty=1e-40),
               dict(presence_penalty=1e308, frequency_penalty=-1e308), dict(temperature=float("inf")),
               dict(temperature=float("nan"), top_p=float("nan"), logprobs=10**6), dict(seed=2**80, temperature=1.0),
               dict(repetition_penalty=float("inf"), min_tokens=10**9, logprobs=5)]
    seqs = [Sequence(ids(loaded, PROMPTS[i % len(PROMPTS)]), SamplingParams(max_tokens=6, ignore_eos=True, **kw))
            for i, kw in enumerate(extreme)]
    good = Sequence(ids(loaded, PROMPTS[0]), _greedy(6))
    e = engine(loaded)
    run_to_completion(e, seqs + [good])
    assert e.step_failures == 0 and e.error is None
    assert [(s.finish_reason, len(s.output_ids)) for s in seqs + [good]] == [("length", 6)] * (len(seqs) + 1)
    import math
    for s in seqs:
        while not s.events.empty():
            _, ev = s.events.get_nowait()
            if getattr(ev, "logprob", None):
                assert all(math.isfinite(v) for v in [ev.logprob[0]] + [lp for _, lp in ev.logprob[1]])


def test_running_never_exceeds_max_batch_size_under_a_threaded_burst(loaded):
    import threading

    e = engine(loaded, max_batch_size=4, max_waiting=100, prefill_thread=True)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(e.num_running)

    e.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        seqs = []
        for wave in range(6):
            batch = [Sequence(ids(loaded, PROMPTS[i % len(PROMPTS)]), _greedy(2 + (i + wave) % 5)) for i in range(7)]
            seqs += batch
            e.submit(batch)
            time.sleep(0.02)
        assert _wait(lambda: all(s.finish_reason is not None for s in seqs), 60)
    finally:
        stop.set()
        watcher.join()
        e.stop()
    assert all(s.finish_reason == "length" for s in seqs)
    assert max(seen) <= 4 and len(seen) > 100, max(seen)


def test_an_adapter_op_that_fails_says_so_and_the_engine_keeps_serving(loaded):
    """A failing adapter load raises to its caller (who would otherwise record it as loaded); the engine lives on."""
    e = engine(loaded)
    e.start()
    try:
        def broken(adapter):
            raise ValueError(f"adapter {adapter.name}: shapes do not match the base model")

        e.ex.lora.add = broken
        adapter = types.SimpleNamespace(name="bad-adapter", path="/nonexistent")
        with pytest.raises(ValueError, match="bad-adapter"):
            e.add_adapter(adapter)
        assert e.error is None and e._thread.is_alive()
        good = Sequence(ids(loaded, "hi"), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        e.submit([good])
        assert _wait(lambda: good.finish_reason is not None)
        assert good.finish_reason == "length" and len(good.output_ids) == 3
    finally:
        e.stop()


def test_a_burst_prefilled_together_beside_the_decode_equals_alone(loaded):
    """The prefill thread takes every waiting prompt into one forward while the batch decodes; the rows then
    decode exactly as alone."""
    alone = [run_to_completion(engine(loaded), [Sequence(ids(loaded, p), _greedy(12))])[0][0] for p in PROMPTS]
    e = engine(loaded, max_batch_size=16, prefill_thread=True, prefill_chunk_tokens=4096)
    forwards: list[int] = []
    inner = e.ex.prefill_forward
    e.ex.prefill_forward = lambda prompts, rows: forwards.append(len(prompts)) or inner(prompts, rows)
    e.start()
    try:
        first = Sequence(ids(loaded, PROMPTS[0]), _greedy(200))
        e.submit([first])
        assert _wait(lambda: len(first.output_ids) > 2)
        burst = [Sequence(ids(loaded, p), _greedy(12)) for p in PROMPTS]
        e.submit(burst)  # one call: every prompt waits before the prefill thread looks
        assert _wait(lambda: all(s.finish_reason is not None for s in burst), 60)
        e.cancel([first])
    finally:
        e.stop()
    assert forwards[:2] == [1, len(PROMPTS)], forwards  # the burst shared one forward beside the decode
    assert [s.output_ids for s in burst] == alone
