"""bfloat16 serving: its logits stay close to float32's and its greedy tokens equal them (but for near-ties) on the tiny model.

Runs on CPUs with AVX512-BF16 (oneDNN's bf16 kernels) and on GPUs; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from kaito.runtime.engine import Engine, Sequence, run_to_completion
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.settings import RuntimeSettings

PROMPTS = [[1, 50, 60], [1, 70, 80, 90, 100, 110, 120], [1, 5], [1, 300, 301, 302, 9, 9, 9, 9, 9, 9, 9]]
BF16_OK = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
pytestmark = pytest.mark.skipif(not BF16_OK, reason="no bfloat16 kernels here (needs AVX512-BF16 or a GPU)")


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return {
        dt: load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3", dtype=dt))
        for dt in ("float32", "bfloat16")
    }


def test_bf16_loads_in_bf16_and_its_logits_stay_close_to_fp32(pair):
    assert next(pair["bfloat16"].model.parameters()).dtype == torch.bfloat16
    logits = {}
    for dt, loaded in pair.items():
        ex = BatchExecutor(loaded.model)
        steps = [ex.prefill(PROMPTS, [()] * len(PROMPTS))]
        for step in range(8):
            steps.append(ex.decode([(11 * step + r) % 500 + 3 for r in range(ex.batch_size)]))
        logits[dt] = torch.stack(steps).float()
    a, b = logits["float32"], logits["bfloat16"]
    assert torch.isfinite(b).all()
    scale = a.abs().max()
    assert (a - b).abs().max() <= 0.03 * scale, (
        f"bf16 logits drift {float((a - b).abs().max()):.4f} (fp32 scale {float(scale):.3f})"
    )


def test_bf16_greedy_tokens_equal_fp32_except_near_ties(pair):
    """Teacher-forced on fp32's greedy tokens, bf16 picks the same token at every step where fp32's top two
    logits are not a near-tie (a random-weight model has many ties closer than bf16's rounding, ~0.4%)."""
    exs = {dt: BatchExecutor(loaded.model) for dt, loaded in pair.items()}
    logits = {dt: ex.prefill(PROMPTS, [()] * len(PROMPTS)).float() for dt, ex in exs.items()}
    compared = agreed = 0
    for _ in range(24):
        a, b = logits["float32"], logits["bfloat16"]
        top2 = a.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.02 * a.abs().max()
        compared += int(clear.sum())
        agreed += int((clear & (a.argmax(-1) == b.argmax(-1))).sum())
        nxt = a.argmax(-1).tolist()
        logits = {dt: ex.decode(nxt).float() for dt, ex in exs.items()}
    assert compared >= 24 * len(PROMPTS) // 2, "too few clear steps to say anything"
    assert agreed == compared


def test_bf16_engine_serves_greedy_to_the_end(pair):
    loaded = pair["bfloat16"]
    e = Engine(
        BatchExecutor(loaded.model), loaded.tokenizer, eos_ids=loaded.eos_ids, max_model_len=loaded.max_model_len
    )
    seqs = [Sequence(list(p), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    out = run_to_completion(e, seqs)
    assert [len(r[0]) for r in out] == [16] * len(PROMPTS) and all(s.finish_reason == "length" for s in seqs)
