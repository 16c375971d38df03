"""compile_decode: the server's decode step through torch.compile gives the eager server's greedy output, for
base and adapter rows in mixed batches, compiles its graphs before it turns ready and never while serving."""

from __future__ import annotations

import asyncio

import torch
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.settings import RuntimeSettings

from .conftest import asgi_client, settings_for

PROMPTS = ["the cat sat", "a model that serves many requests at once", "why", "one two three four five six seven eight"]


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


async def _completions(client, adapter: bool) -> dict[tuple[str, str], str]:
    """Greedy completions of every prompt, all at once; with `adapter`, each also on adapter `alpha` (mixed
    batches: alpha is loaded at strength 0, so the base model's rows stay bare, and its own rows ask for 1)."""
    async def one(model: str, prompt: str) -> tuple[tuple[str, str], str]:
        body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        if model == "alpha":
            body["adapter_strength"] = 1.0
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return (model, prompt), r.json()["choices"][0]["text"]

    models = ("tiny-phi-3", "alpha") if adapter else ("tiny-phi-3",)
    return dict(await asyncio.gather(*[one(m, p) for p in PROMPTS for m in models]))


async def _serve(client, adapters_dir) -> tuple[dict, dict]:
    """Base rows alone, then alpha loaded at run time and mixed in."""
    base = await _completions(client, adapter=False)
    r = await client.post("/v1/load_lora_adapter",
                          json={"lora_name": "alpha", "lora_path": str(adapters_dir / "alpha"), "strength": 0})
    assert r.status_code == 200, r.text
    return base, await _completions(client, adapter=True)


async def test_compiled_server_matches_eager_and_never_recompiles(tiny_model_dir, adapters_dir):
    torch._dynamo.reset()  # graphs of other tests' models would count against dynamo's per-function cache
    async with asgi_client(settings_for(tiny_model_dir, compile_decode=True), ready_s=600) as c:
        ex = c.app.state.runtime.engine.ex
        assert ex.compiled and ex.fast.packed == 0, "compile_decode compiles the step over the dense linears"
        warm = _graphs()
        assert warm >= 3, f"warmup compiled {warm} graphs; expected one row, rows with and without padding"
        calls: list[int] = []
        compiled = ex.fast.compiled
        ex.fast.compiled = lambda *a: (calls.append(a[0].shape[0]), compiled(*a))[1]
        got_base, got_mixed = await _serve(c, adapters_dir)
        assert _graphs() == warm, "a decode step recompiled while serving"
        assert calls and max(calls) > 1, "no batched decode step went through the compiled graph"
    async with asgi_client(settings_for(tiny_model_dir)) as c:
        assert not c.app.state.runtime.engine.ex.compiled
        want_base, want_mixed = await _serve(c, adapters_dir)
    assert got_base == want_base
    assert got_mixed == want_mixed
    assert {k: v for k, v in got_mixed.items() if k[0] == "tiny-phi-3"} == got_base
    assert got_mixed[("alpha", PROMPTS[0])] != got_base[("tiny-phi-3", PROMPTS[0])], "alpha's rows ran bare"


def test_compile_decode_falls_back_when_linears_are_packed(tiny_model_dir):
    """Linears an earlier executor packed cannot be compiled over: that executor decodes eagerly."""
    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))
    first = BatchExecutor(loaded.model)
    second = BatchExecutor(loaded.model, compile_decode=True)
    assert first.fast is not None and first.fast.packed and not second.compiled


def test_compile_decode_refuses_linears_with_hooks(tiny_model_dir):
    """A linear hooked before the executor exists (a quantization or offloading wrapper's hook) would be
    skipped by the compiled step: that model decodes eagerly, hooks applied."""
    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))
    seen: list[int] = []
    layer = loaded.model.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda m, args, out: seen.append(1))
    ex = BatchExecutor(loaded.model, compile_decode=True)
    assert ex.fast is not None and not ex.compiled
    ex.warmup(0)  # a no-op without compiled graphs
    assert ex.batch_size == 0 and not seen
    ex.prefill([[1, 5, 6]], [()])
    ex.decode([7])
    assert seen, "the hook did not run"
