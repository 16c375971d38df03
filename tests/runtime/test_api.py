"""Every endpoint and error of the HTTP contract, in-process (httpx ASGI transport)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from kaito.runtime.api import build_app
from kaito.runtime.serving import Runtime

from .conftest import asgi_client, settings_for

GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture
async def client(tiny_model_dir, adapters_dir):
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir)) as c:
        yield c


async def test_root_health_models_metrics(client):
    assert (await client.get("/")).json() == {"message": "Server is running"}
    for path in ("/health", "/healthz"):
        r = await client.get(path)
        assert r.status_code == 200 and r.json() == {"status": "Healthy"}
    models = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["tiny-phi-3", "alpha", "beta"]
    assert models[0]["parent"] is None and {m["parent"] for m in models[1:]} == {"tiny-phi-3"}
    assert (await client.get("/v1/models/alpha")).json() == models[1]
    assert (await client.get("/v1/models/tiny-phi-3")).json() == models[0]
    r = await client.get("/v1/models/gamma")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    text = (await client.get("/metrics")).text
    for name in ('vllm:num_requests_running{engine="0",model_name="tiny-phi-3"}', "vllm:num_requests_waiting{",
                 "vllm:prompt_tokens_total{", "vllm:generation_tokens_total{", "vllm:time_to_first_token_seconds_bucket{",
                 "vllm:inter_token_latency_seconds_bucket{", "vllm:e2e_request_latency_seconds_bucket{",
                 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-phi-3"}',
                 "kaito:lora_adapter_loads_total 2.0", "process_cpu_seconds_total"):
        assert name in text, name
    info = (await client.get("/kaito/metrics")).json()
    assert info["cpu_info"]["total_cores"] >= 1 and "memory" in info["cpu_info"]


async def test_health_is_503_while_loading_and_on_failure(tiny_model_dir, tmp_path):
    s = settings_for(tiny_model_dir)
    rt = Runtime(s)
    gate, real = threading.Event(), rt.load
    rt.load = lambda: (gate.wait(30), real())
    app = build_app(s, runtime=rt)
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "Loading"
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            assert r.headers["retry-after"]
            gate.set()
            await asyncio.to_thread(rt.ready.wait, 30)
            assert (await c.get("/health")).status_code == 200
    bad = settings_for(tmp_path / "nowhere")
    async with asgi_client(bad) as c:
        r = await c.get("/health")
        assert r.status_code == 503 and "config.json" in r.json()["detail"]


async def test_health_of_a_failed_load_without_a_message_is_503_not_500(tiny_model_dir):
    """A load that failed with an exception whose text is empty (no engine was built): /health still answers."""
    import httpx

    s = settings_for(tiny_model_dir)
    rt = Runtime(s)
    rt.status, rt.error = "failed", ""
    app = build_app(s, runtime=rt)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "Unhealthy",
                                                          "detail": "unhealthy: unknown error; see the server log"}
            r = await c.get("/v1/models")
            assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"


async def test_kaito_chat_contract(client):
    r = await client.post("/chat", json={"prompt": "What is a GPU?", "generate_kwargs": GREEDY})
    assert r.status_code == 200
    full = r.json()["Result"]
    assert full.startswith("What is a GPU?") and len(full) > len("What is a GPU?")
    r2 = await client.post("/chat", json={"prompt": "What is a GPU?", "return_full_text": False,
                                          "generate_kwargs": {**GREEDY, "some_unknown_kwarg": 3}})
    assert r2.json()["Result"] == full[len("What is a GPU?"):]
    # Kaito's defaults (do_sample with top_k=10, max_length=200) answer too.
    r = await client.post("/chat", json={"prompt": "hello"})
    assert r.status_code == 200 and r.json()["Result"].startswith("hello")
    r = await client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}], "generate_kwargs": GREEDY})
    assert r.status_code == 200 and isinstance(r.json()["Result"], str)
    r = await client.post("/chat", json={})
    assert r.status_code == 400 and r.json() == {"detail": "Text generation parameter prompt required"}
    r = await client.post("/chat", json={"messages": []})
    assert r.status_code == 400 and r.json() == {"detail": "Conversational parameter messages required"}
    r = await client.post("/chat", json={"prompt": "x", "generate_kwargs": {"max_length": "many"}})
    assert r.status_code == 422 and "max_length" in r.json()["detail"]
    # num_return_sequences are concatenated, as Kaito did.
    r = await client.post("/chat", json={"prompt": "ab", "return_full_text": False,
                                         "generate_kwargs": {**GREEDY, "num_return_sequences": 2}})
    one = (await client.post("/chat", json={"prompt": "ab", "return_full_text": False, "generate_kwargs": GREEDY})).json()["Result"]
    assert r.json()["Result"] == one * 2


async def test_kaito_chat_long_prompts(client):
    long = "word " * 1500
    r = await client.post("/chat", json={"prompt": long, "generate_kwargs": {"max_new_tokens": 5}})
    assert r.status_code == 400 and "1024" in r.json()["detail"] and "hole" in r.json()["detail"]
    r = await client.post("/chat", json={"prompt": long, "return_full_text": False, "handle_long_generation": "hole",
                                         "generate_kwargs": {"max_new_tokens": 5, "do_sample": False}})
    assert r.status_code == 200 and r.json()["Result"]
    r = await client.post("/chat", json={"prompt": "x " * 300, "generate_kwargs": {"max_length": 10}})
    assert r.status_code == 400 and "max_length" in r.json()["detail"]


async def test_chat_and_preset_name_use_merged_adapters_adapter_name_alone(client):
    rt = client.app.state.runtime
    assert rt.merged_spec() == (("alpha", 1.0), ("beta", 1.0))

    async def complete(**kw):
        r = await client.post("/v1/completions", json={"prompt": "What is a GPU?", "max_tokens": 12, "temperature": 0, "ignore_eos": True, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    merged = await complete(model="tiny-phi-3")
    assert merged == await complete()
    kaito = (await client.post("/chat", json={"prompt": "What is a GPU?", "return_full_text": False,
                                              "generate_kwargs": {"do_sample": False, "max_new_tokens": 12}})).json()["Result"]
    assert kaito.startswith(merged[:5])
    alpha, beta = await complete(model="alpha"), await complete(model="beta")
    zero = await complete(model="alpha", adapter_strength=0.0)
    assert len({merged, alpha, beta, zero}) == 4
    rt.strengths.update(alpha=0.0, beta=0.0)  # all strengths 0: the merged model is the bare base
    try:
        assert await complete() == zero
    finally:
        rt.strengths.update(alpha=1.0, beta=1.0)
    r = await client.post("/v1/completions", json={"prompt": "x", "model": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"prompt": "x", "adapter_strength": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_strength"


async def test_load_and_unload_adapters(client, spare_adapter, tmp_path):
    before = (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True})).json()
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(spare_adapter)})
    assert r.status_code == 200 and "gamma" in r.json()
    assert "gamma" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    r = await client.post("/v1/completions", json={"prompt": "hi", "model": "gamma", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    assert (await client.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(spare_adapter)})).status_code == 400
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(tmp_path / "none")})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(tmp_path / "bad")})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "delta"})
    assert r.status_code == 400
    # An empty lora_path is no path (it would resolve to the server's working directory).
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": ""})
    assert r.status_code == 400 and "exactly one of lora_path" in r.json()["error"]["message"]
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200
    assert (await client.post("/v1/completions", json={"prompt": "hi", "model": "gamma"})).status_code == 404
    assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})).status_code == 404
    after = (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True})).json()
    assert after["choices"][0]["text"] == before["choices"][0]["text"]  # merged set is back to alpha+beta


async def test_adapter_changes_the_engine_did_not_make_are_503_and_not_recorded(client, spare_adapter):
    """The engine raises for an adapter change it did not make (stopped, timed out): the API says 503 and never
    lists a load that did not happen."""
    from kaito.runtime.sequence import EngineDead

    engine = client.app.state.runtime.engine

    def dead(*args):
        raise EngineDead("the engine is stopped")
    engine.add_adapter, engine.remove_adapter = dead, dead
    try:
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(spare_adapter)})
        assert r.status_code == 503 and "loading adapter gamma: the engine is stopped" in r.json()["error"]["message"]
        assert "gamma" not in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
        assert r.status_code == 503 and "unloading adapter alpha" in r.json()["error"]["message"]
        # No new request resolves an adapter being unloaded, whatever the engine answered.
        assert (await client.post("/v1/completions", json={"prompt": "hi", "model": "alpha"})).status_code == 404
    finally:
        del engine.add_adapter, engine.remove_adapter


async def test_lora_loading_can_be_disabled(tiny_model_dir, spare_adapter):
    async with asgi_client(settings_for(tiny_model_dir, enable_lora_loading=False)) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": str(spare_adapter)})
        assert r.status_code == 403 and "enable_lora_loading" in r.json()["error"]["message"]


async def test_openai_errors(client):
    r = await client.post("/v1/completions", json={"prompt": "word " * 1100, "max_tokens": 5})
    err = r.json()["error"]
    n_tokens = len(client.app.state.runtime.loaded.tokenizer("word " * 1100)["input_ids"])
    assert r.status_code == 400 and "1024" in err["message"] and f"{n_tokens} tokens" in err["message"]
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1020})
    assert r.status_code == 400 and "in the messages" in r.json()["error"]["message"]
    for bad in ({"prompt": "x", "max_tokens": -1}, {"prompt": "x", "max_tokens": 10**12}, {"prompt": "x", "temperature": 9},
                {"prompt": "x", "n": 1000}, {"prompt": [10**9]}, {"prompt": []}, {"prompt": "x", "stop": [""]},
                {"prompt": "x", "suffix": "y"}, {"max_tokens": 3}, {"prompt": ""}):
        r = await client.post("/v1/completions", json=bad)
        assert r.status_code == 400, (bad, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await client.post("/v1/chat/completions", content=b'{"messages": [}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    assert (await client.get("/v1/nothing")).json()["error"]["code"] == 404
    assert (await client.get("/v1/completions")).status_code == 405
    r = await client.post("/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413
    r = await client.post("/v1/completions", content=b"[" * 100000)
    assert r.status_code == 400
    assert (await client.get("/health")).status_code == 200


async def test_overload_gives_429_with_retry_after(tiny_model_dir):
    async with asgi_client(settings_for(tiny_model_dir, max_batch_size=1, max_waiting=0)) as c:
        body = {"prompt": "hi", "max_tokens": 80, "temperature": 0, "ignore_eos": True}
        results = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(4)])
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and 429 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "RateLimitError"
        assert 'kaito:request_rejected_total{reason="queue_full"}' in (await c.get("/metrics")).text
        assert (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200


async def test_api_key(tiny_model_dir):
    async with asgi_client(settings_for(tiny_model_dir, api_key="s3cret")) as c:
        assert (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 401
        r = await c.post("/chat", json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "s3cret" not in r.text
        ok = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes stay open


async def test_chat_completion_shape_n_logprobs_and_stream(client):
    body = {"model": "tiny-phi-3", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0.8, "seed": 3, "n": 3, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    r = (await client.post("/v1/chat/completions", json=body)).json()
    assert r["object"] == "chat.completion" and len(r["choices"]) == 3
    assert r["usage"]["completion_tokens"] == 18 and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 18
    lp = r["choices"][0]["logprobs"]["content"]
    assert len(lp) == 6 and len(lp[0]["top_logprobs"]) == 2 and lp[0]["logprob"] <= 0
    again = (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in r["choices"]]
    streamed = {**body, "stream": True, "logprobs": False, "top_logprobs": None, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=streamed) as s:
        lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    text = {i: "" for i in range(3)}
    for ch in chunks:
        for c in ch["choices"]:
            text[c["index"]] += c["delta"].get("content", "")
    assert [text[i] for i in range(3)] == [c["message"]["content"] for c in r["choices"]]
    assert chunks[-1]["usage"]["completion_tokens"] == 18


async def test_load_adapter_from_image(client, spare_adapter, registry, tmp_path):
    from kaito.image_builder.build import build_adapter

    ref = f"{registry.host}/adapters/gamma:v1"
    await asyncio.to_thread(build_adapter, spare_adapter, ref, preset_name="tiny-phi-3")
    client.app.state.runtime.settings.adapter_pull_root = tmp_path / "pulled"
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "gamma-img", "image": ref, "strength": 1.0})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "gamma-dir", "lora_path": str(spare_adapter)})
    assert r.status_code == 200

    async def out(model):
        r = await client.post("/v1/completions", json={"prompt": "hi", "model": model, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
        return r.json()["choices"][0]["text"]

    assert await out("gamma-img") == await out("gamma-dir")
    assert await out("gamma-img") != await out("alpha")
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "image": f"{registry.host}/adapters/missing:v1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert not [p for p in (tmp_path / "pulled").iterdir() if p.name.startswith("ghost")]
    for name in ("gamma-img", "gamma-dir"):
        assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": name})).status_code == 200


async def test_engine_failure_is_a_500_envelope_and_the_server_recovers(client):
    ex = client.app.state.runtime.engine.ex
    real = ex.decode

    def broken(tokens):
        raise RuntimeError("simulated device error")

    ex.decode = broken
    try:
        body = {"prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError", r.text
        assert "Traceback" not in r.text and "simulated" not in r.text
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            lines = [x async for x in s.aiter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == 500
    finally:
        ex.decode = real
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    assert (await client.get("/health")).status_code == 200


def test_one_forward_thread_by_default_and_a_warning_for_the_prefill_thread_beside_several(tiny_model_dir, caplog):
    """Default: every forward on the engine thread. The prefill thread asked for beside 2 torch threads on CPU
    is kept (the user chose it) but the log says why it is slow there."""
    import logging

    import torch

    before = torch.get_num_threads()
    try:
        rt = Runtime(settings_for(tiny_model_dir))
        rt.load()
        assert rt.status == "ready" and rt.engine._prefiller is None
        rt.close()
        with caplog.at_level(logging.WARNING, logger="kaito.runtime"):
            rt = Runtime(settings_for(tiny_model_dir, prefill_thread=True, torch_threads=2))
            rt.load()
        assert rt.status == "ready" and rt.engine._prefiller is not None
        assert any("prefill_thread with 2 torch threads" in r.getMessage() for r in caplog.records)
        rt.close()
    finally:
        torch.set_num_threads(before)


def test_the_loaded_heap_is_out_of_the_collectors_reach_until_close(tiny_model_dir):
    """A full garbage collection walks only what serving allocated, not the ~10^5 objects of torch,
    transformers and the model (a 100+ ms GIL stall on the 88M model)."""
    import gc

    rt = Runtime(settings_for(tiny_model_dir))
    rt.load()
    try:
        frozen = gc.get_freeze_count()
        assert rt.status == "ready" and frozen > 10_000
        assert len(gc.get_objects()) < frozen / 10, "a full collection would still walk the loaded heap"
    finally:
        rt.close()
    assert gc.get_freeze_count() == 0
