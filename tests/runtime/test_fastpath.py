"""Hot-path shortcuts give the same results as the general paths: fast prefill and decode forwards, all-greedy
sampling, chunked prefill, in-place cache reuse and hole-filling eviction."""

from __future__ import annotations

import pytest
import torch
from kaito.runtime.engine import Engine, Sequence, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.sampling import SamplingParams, sample, sample_general
from kaito.runtime.scheduler import chunks as _chunks, fill_holes as _fill_holes
from kaito.runtime.sequence import EngineDead
from kaito.runtime.settings import RuntimeSettings

PROMPTS = [[1, 50, 60], [1, 70, 80, 90, 100, 110, 120], [1, 5], [1, 300, 301, 302, 9, 9, 9, 9, 9, 9, 9]]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_fast_decode_matches_transformers_forward(loaded):
    fast, slow = BatchExecutor(loaded.model), BatchExecutor(loaded.model)
    slow.fast = None
    assert fast.fast is not None, "the tiny Phi-3 should take the fast decode path"
    for ex in (fast, slow):
        ex.prefill(PROMPTS[:3], [()] * 3)
    outs = {id(ex): [] for ex in (fast, slow)}
    for step in range(12):
        for ex in (fast, slow):
            if step == 4:  # a row leaves (a hole is filled) and a longer prompt joins: padding on both sides
                ex.evict([0, 2])
                ex.prefill([PROMPTS[3]], [()])
            toks = [(7 * step + r) % 500 + 3 for r in range(ex.batch_size)]
            outs[id(ex)].append(ex.decode(toks))
    for a, b in zip(outs[id(fast)], outs[id(slow)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


def test_fast_prefill_matches_transformers_forward(loaded):
    """Left-padded prompts of different lengths: same last logits and same K/V at every real position,
    and the padding positions' K/V (kept, masked, in the cache) are finite."""
    fast, slow = BatchExecutor(loaded.model), BatchExecutor(loaded.model)
    slow.fast = None
    a, b = fast.prefill(PROMPTS, [()] * 4), slow.prefill(PROMPTS, [()] * 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    real = fast.mask.bool()
    assert real.sum(-1).tolist() == [len(p) for p in PROMPTS]
    for (fk, fv), (sk, sv) in zip(fast.kv, slow.kv):
        assert torch.isfinite(fk).all() and torch.isfinite(fv).all()
        for x, y in ((fk, sk), (fv, sv)):
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_fast_greedy_sampling_equals_general_path():
    class S:
        def __init__(self, params):
            self.params, self.output_ids, self.prompt_ids, self.generator = params, [4, 4], [1], None

    torch.manual_seed(0)
    logits = torch.randn(6, 64)
    seqs = [S(SamplingParams(temperature=0)) for _ in range(6)]
    fast_tokens, infos = sample(logits, seqs, [3])
    assert fast_tokens == sample_general(logits, seqs, [3])[0] == logits.argmax(-1).tolist()
    assert infos == [None] * 6
    # One row asking for logprobs sends the batch down the general path; greedy rows still agree.
    seqs[2].params = SamplingParams(temperature=0, logprobs=2)
    tokens, infos = sample(logits, seqs, [3])
    assert tokens == fast_tokens and infos[2] is not None and len(infos[2][1]) == 2


def test_chunked_prefill_and_reused_cache_give_the_same_tokens(loaded):
    alone = [run_to_completion(Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                                      max_model_len=loaded.max_model_len), [Sequence(p, greedy(10))])[0][0] for p in PROMPTS]
    for chunk in (1, 8, 4096):
        e = Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                   max_model_len=loaded.max_model_len, prefill_chunk_tokens=chunk)
        seqs = [Sequence(p, greedy(10)) for p in PROMPTS]
        run_to_completion(e, seqs)
        assert [s.output_ids for s in seqs] == alone, f"prefill_chunk_tokens={chunk}"
        e.step()  # evicts everything; the buffers stay for reuse
        assert e.ex.batch_size == 0 and e.ex.bufs
        # Stale contents of reused rows/columns must never leak into new sequences (NaN would poison attention).
        with torch.inference_mode():
            for k, v in e.ex.bufs:
                k.fill_(float("nan"))
                v.fill_(float("nan"))
        again = [Sequence(p, greedy(10)) for p in reversed(PROMPTS)]
        run_to_completion(e, again)
        assert [s.output_ids for s in again] == alone[::-1]


def test_prefill_chunks_and_hole_filling_order():
    assert _chunks([18] * 32, 128) == [7, 7, 7, 7, 4]
    assert _chunks([300, 10, 10], 128) == [1, 2] and _chunks([], 128) == []
    # Survivors stay put; the last survivors move into the holes (one row copy per eviction).
    assert _fill_holes([True, False, True, True, False, True]) == [0, 5, 2, 3]
    assert _fill_holes([False, False, True]) == [2] and _fill_holes([True, True]) == [0, 1]
    assert _fill_holes([False]) == []


def test_inline_scheduler_decodes_first_then_admits_within_its_time_budget(loaded):
    """Without the prefill thread (torchrun, or prefill_thread off) a step decodes the running rows and then
    admits arrivals: with a near-zero prefill_step_ratio one per step (running rows still advance every
    step) unless they fit in the one chunk a step always takes, with ratio 0 all at once; the tokens are
    those of each prompt run alone."""
    def engine(ratio, chunk=1):
        return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                      max_model_len=loaded.max_model_len, prefill_step_ratio=ratio, prefill_chunk_tokens=chunk)

    alone = [run_to_completion(engine(0), [Sequence(p, greedy(6))])[0][0] for p in PROMPTS]
    together = [[2, 1, 1, 1], [3, 2, 2, 2]]
    cases = ((1e-9, 1, [[2, 1, 0, 0], [3, 2, 1, 0], [4, 3, 2, 1]]), (0, 1, together), (1e-9, 4096, together))
    for ratio, chunk, want in cases:
        e = engine(ratio, chunk)
        seqs = [Sequence(p, greedy(6)) for p in PROMPTS]
        e.submit(seqs[:1])
        e.step()  # nothing was running: the first prompt is prefilled
        e.submit(seqs[1:])
        counts = []
        while any(s.finish_reason is None for s in seqs):
            e.step()
            counts.append([len(s.output_ids) for s in seqs])
        assert counts[:len(want)] == want, f"ratio {ratio}, chunk {chunk}"
        assert [s.output_ids for s in seqs] == alone


def _wait(cond, timeout=60.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def test_prefill_thread_serves_arrivals_while_the_batch_decodes(loaded):
    """With the prefill thread, arrivals are prefilled on it (never inline) while a long row keeps decoding,
    their rows are merged between decode steps, and every output equals its prompt run alone."""
    import threading

    def engine(**kw):
        return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                      max_model_len=loaded.max_model_len, **kw)

    cases = [(PROMPTS[1], 80)] + [(p, 8) for p in PROMPTS] + [(PROMPTS[0], 1)]
    alone = [run_to_completion(engine(), [Sequence(p, greedy(n))])[0][0] for p, n in cases]
    e = engine(prefill_thread=True)
    assert e.ex.fast.layout.groups and not e.ex.fast.layout.enabled, "no layout switch beside the prefill thread"
    threads: list[str] = []
    forward = e.ex.prefill_forward

    def spy(*a, **kw):
        threads.append(threading.current_thread().name)
        return forward(*a, **kw)

    e.ex.prefill_forward = spy
    e.ex.prefill = lambda *a, **kw: pytest.fail("the engine thread prefilled inline")
    e.start()
    try:
        long = Sequence(cases[0][0], greedy(cases[0][1]))
        e.submit([long])
        assert _wait(lambda: len(long.output_ids) >= 5)
        later = [Sequence(p, greedy(n)) for p, n in cases[1:]]
        for s in later:  # one request at a time, as separate clients would
            e.submit([s])
        assert _wait(lambda: all(s.finish_reason is not None for s in [long] + later))
        assert long.finish_reason == "length" and all(s.finish_reason == "length" for s in later)
        assert all(s.first_token_at < long.last_token_at for s in later)
        assert [long.output_ids] + [s.output_ids for s in later] == alone
        assert threads and set(threads) == {"kaito-prefill"}
        assert _wait(lambda: e.num_running == 0 and not e.running)  # the 1-token row was merged, then evicted
    finally:
        e.stop()
    assert e.error is None


def test_rotary_that_rescales_by_length_keeps_prefill_on_the_engine_thread(loaded):
    from transformers import Phi3Config, Phi3ForCausalLM

    assert BatchExecutor(loaded.model).concurrent_prefill_ok()
    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=64,
                     rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
                     pad_token_id=0, eos_token_id=1, bos_token_id=1)
    assert not BatchExecutor(Phi3ForCausalLM(cfg).eval()).concurrent_prefill_ok()
    slow = BatchExecutor(loaded.model)
    slow.fast = None  # an architecture outside the fast path: its modules may keep per-call state
    assert not slow.concurrent_prefill_ok()


def test_a_failing_prefill_on_the_thread_fails_its_requests_only(loaded):
    """A prefill forward that raises on the prefill thread ends its requests with an error and the engine
    keeps serving; when the one-token probe after it fails too (the device, not the request), the engine
    stops, nobody is left waiting, and later submissions are refused."""
    e = Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
               max_model_len=loaded.max_model_len, prefill_thread=True)
    real, fail = e.ex.prefill_forward, {"left": 1}

    def flaky(*a, **kw):
        if fail["left"] > 0:
            fail["left"] -= 1
            raise RuntimeError("simulated prefill failure")
        return real(*a, **kw)

    e.ex.prefill_forward = flaky
    e.start()
    try:
        bad = Sequence(PROMPTS[0], greedy(4))
        e.submit([bad])
        assert _wait(lambda: bad.finish_reason is not None)
        assert bad.finish_reason == "error" and e.error is None and e.step_failures == 1
        good = Sequence(PROMPTS[0], greedy(4))
        e.submit([good])
        assert _wait(lambda: good.finish_reason is not None)
        assert good.finish_reason == "length" and len(good.output_ids) == 4
        fail["left"] = 2  # the request's forward and the probe after it
        doomed = Sequence(PROMPTS[1], greedy(4))
        e.submit([doomed])
        assert _wait(lambda: doomed.finish_reason is not None)
        assert doomed.finish_reason == "error" and isinstance(e.error, EngineDead) and "probe" in str(e.error)
        assert _wait(lambda: not e._thread.is_alive() and not e._prefiller.is_alive())
        with pytest.raises(EngineDead):
            e.submit([Sequence(PROMPTS[2], greedy(4))])
    finally:
        e.stop()


PACKING = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(str(path) in line for line in f)


@PACKING
def test_packed_linears_replace_the_dense_weights_and_keep_every_path(tiny_model_dir, tmp_path, monkeypatch):
    """Packing leaves one copy of each linear weight: the dense Parameters are freed and the checkpoint file
    is no longer mapped. transformers' forward, state_dict(), load_state_dict(), deep copies and moves still
    see the model's own weights."""
    import copy
    import gc
    import shutil
    import weakref

    from kaito.runtime.packing import PackedLinear

    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")  # a file no other test's model maps
    model = load(RuntimeSettings(model_dir=model_dir, preset="tiny-phi-3", device="cpu")).model
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        want = model(ids).logits
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    freed = [weakref.ref(m.weight) for m in linears]
    assert _mapped(model_dir / "model.safetensors")

    assert BatchExecutor(model).fast.packed == len(linears)
    gc.collect()
    assert all(type(m) is PackedLinear and m.weight.is_mkldnn for m in linears)
    assert not any(r() is not None for r in freed), "a dense weight outlived its packed copy"
    assert not _mapped(model_dir / "model.safetensors"), "the checkpoint file is still mapped"

    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    assert state.keys() == dense.keys() and all(torch.equal(state[k], v) for k, v in dense.items())
    model.load_state_dict(state)
    assert all(type(m) is PackedLinear and m.weight.is_mkldnn for m in linears)
    twin = copy.deepcopy(model)  # a copy is plain Linears with dense weights, free to edit or move
    assert not any(isinstance(m, PackedLinear) for m in twin.modules())
    twin.to(torch.float64)
    assert all(type(m) is PackedLinear for m in linears), "the copy shares modules with the original"
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits.float(), want, atol=1e-4, rtol=1e-4)
    moved = linears[0].to(torch.float64)  # moving or casting a packed module unpacks it first
    assert type(moved) is torch.nn.Linear and moved.weight.dtype == torch.float64


@PACKING
def test_a_tied_lm_head_stays_dense_and_shared(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kaito.runtime.packing import PackedLinear

    monkeypatch.delenv("KAITO_PACKED_LINEARS", raising=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        want = model(ids).logits
    ex = BatchExecutor(model)
    assert ex.fast is not None and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].mlp.down_proj) is PackedLinear
    torch.testing.assert_close(ex.prefill([ids[0].tolist()], [()]), want[:, -1], atol=1e-5, rtol=1e-5)
