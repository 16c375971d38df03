"""CUDA paths, skipped where torch sees no GPU (markers gpu, multi_gpu): the engine, its fast paths and the
prefill thread give transformers' greedy tokens on a GPU; bfloat16 serves; a 2-GPU torchrun (NCCL, tensor
parallel) answers as one process does."""

from __future__ import annotations

import time

import pytest

from .conftest import asgi_client, settings_for
from .test_torchrun import _outputs, torchrun_server


def _greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Reference: transformers' own forward and cache, argmax, EOS not special (as ignore_eos)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[toks[-1]]], device=model.device), past_key_values=out.past_key_values,
                        use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


@pytest.mark.gpu
def test_engine_on_cuda_matches_generate_with_the_prefill_thread(tiny_model_dir):
    from kaito.runtime.engine import Engine, Sequence
    from kaito.runtime.executor import BatchExecutor
    from kaito.runtime.loader import load
    from kaito.runtime.sampling import SamplingParams
    from kaito.runtime.settings import RuntimeSettings

    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3", device="cuda"))
    assert loaded.model.device.type == "cuda"
    ex = BatchExecutor(loaded.model)
    assert ex.fast is not None and ex.concurrent_prefill_ok()
    prompts = [[1, 50, 60], [1, 70, 80, 90, 100, 110, 120], [1, 5], [1, 300, 301, 302, 9, 9, 9]]
    want = [_greedy_reference(loaded.model, p, 16) for p in prompts]
    e = Engine(ex, loaded.tokenizer, eos_ids=loaded.eos_ids, max_model_len=loaded.max_model_len, prefill_thread=True)
    e.start()
    try:
        seqs = [Sequence(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)) for p in prompts]
        for s in seqs:  # staggered: later ones are prefilled while earlier ones decode
            e.submit([s])
            time.sleep(0.01)
        end = time.monotonic() + 60
        while any(s.finish_reason is None for s in seqs) and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        e.stop()
    assert e.error is None
    assert [s.output_ids for s in seqs] == want


@pytest.mark.gpu
async def test_bfloat16_on_cuda_serves_the_openai_api(tiny_model_dir, adapters_dir):
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir, device="cuda", dtype="bfloat16")) as c:
        r = await c.post("/v1/completions", json={"prompt": "What is a GPU?", "max_tokens": 12, "ignore_eos": True,
                                                  "temperature": 0, "model": "alpha"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12


@pytest.mark.multi_gpu
@pytest.mark.slow
async def test_two_gpu_torchrun_matches_one_process(tiny_model_dir, adapters_dir, tmp_path):
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir, device="cuda")) as c:
        expected = await _outputs("", c)
    async with torchrun_server(tmp_path, tiny_model_dir, adapters_dir, timeout=300) as (url, _):
        assert await _outputs(url) == expected
