"""Hot-path shortcuts give the same results as the general paths: fast prefill and decode forwards, all-greedy
sampling, chunked prefill, in-place cache reuse and hole-filling eviction."""

from __future__ import annotations

import pytest
import torch
from kaito.runtime.engine import Engine, Sequence, _chunks, _fill_holes, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.sampling import SamplingParams, sample, sample_general
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


def test_decode_waits_one_step_for_arrivals_but_never_two(loaded):
    """While requests keep waiting for a slot, a step admits them before decoding the running rows, but
    running rows still advance every other step, and the tokens are those of each prompt run alone."""
    def engine():
        # A prefill budget of one prompt per step: the others wait, as in a burst still being parsed.
        return Engine(BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids,
                      max_model_len=loaded.max_model_len, max_prefill_tokens=1)

    alone = [run_to_completion(engine(), [Sequence(p, greedy(6))])[0][0] for p in PROMPTS]
    e = engine()
    seqs = [Sequence(p, greedy(6)) for p in PROMPTS]
    e.submit(seqs)
    counts = []
    while any(s.finish_reason is None for s in seqs):
        e.step()
        counts.append([len(s.output_ids) for s in seqs])
    # Step 1: first prompt's first token. Step 2: second admitted, the first's decode deferred (others wait).
    # Step 3: third admitted and this time the running rows decode.
    assert counts[:3] == [[1, 0, 0, 0], [1, 1, 0, 0], [2, 2, 1, 0]]
    assert [s.output_ids for s in seqs] == alone
