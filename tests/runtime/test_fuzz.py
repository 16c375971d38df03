"""Bounded fuzz across every endpoint: 1,200 hand-made hostile requests, 5,000 cases drawn from the app's own
OpenAPI schema, and a schemathesis (hypothesis) sample of the same schema; no 5xx, no dead engine."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter

import pytest
from support.schema_fuzz import SchemaFuzzer

from .conftest import asgi_client, settings_for

PATHS = ["/chat", "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
         "/v1/models", "/health", "/", "/metrics", "/kaito/metrics", "/v1/../chat", "/v1/%00", "/chat?x=1"]
WEIRD = [None, True, -1, 0, 1, 2**64, -(2**63), 1e308, -1e308, 0.5, "", "x", "\u0000", "\ud7ff\ue000" * 3, "😀" * 50,
         [], {}, [1, 2], {"a": 1}, "A" * 5000, [[[[[]]]]], "<|end|>", "<|endoftext|>" * 20, "../../etc/passwd", "/proc/self",
         float("nan"), float("inf"), [10**9], [-5], ["a", 3], [{"role": "user"}], 1.5]
KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
        "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "adapter_strength",
        "generate_kwargs", "return_full_text", "prefix", "handle_long_generation", "lora_name", "lora_path", "echo",
        "stream_options", "max_completion_tokens", "min_tokens", "suffix", "clean_up_tokenization_spaces", "ignore_eos"]


def _value(rng: random.Random, key: str):
    roll = rng.random()
    if key == "messages" and roll < 0.5:
        return [{"role": rng.choice(["user", "system", "assistant", "tool", "bad", 3]),
                 "content": rng.choice(["hi", "", None, 5, [{"type": "text", "text": "yo"}], "x" * 300])}
                for _ in range(rng.randint(0, 3))]
    if key == "generate_kwargs" and roll < 0.5:
        return {rng.choice(["max_length", "max_new_tokens", "temperature", "top_k", "do_sample", "num_beams",
                            "num_return_sequences", "min_length", "weird"]): rng.choice(WEIRD[:12]) for _ in range(3)}
    if key in ("max_tokens", "max_completion_tokens", "min_tokens") and roll < 0.5:
        return rng.randint(-3, 6)
    if key in ("prompt", "prefix") and roll < 0.4:
        return rng.choice(["hello", "What is a GPU?", "", " ", "\n" * 10, "word " * 700])
    return rng.choice(WEIRD)


def _body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:  # raw garbage bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    if roll < 0.15:
        return rng.choice([b"{", b"[" * 5000 + b"]" * 5000, b"null", b"1", b'"str"', b"{}" * 10, b'{"a":NaN}', b"\xff\xfe"])
    obj = {k: _value(rng, k) for k in rng.sample(KEYS, rng.randint(0, 6))}
    if rng.random() < 0.6:
        obj.setdefault("max_tokens", rng.randint(1, 4))  # keep real generations short
        gk = obj.get("generate_kwargs")
        if isinstance(gk, dict):
            gk["max_new_tokens"] = rng.randint(1, 4)
        else:
            obj["generate_kwargs"] = {"max_new_tokens": rng.randint(1, 4)}
    if obj.get("stream") is True:
        obj["stream"] = rng.random() < 0.5
    try:
        return json.dumps(obj, allow_nan=True).encode()
    except (ValueError, TypeError):
        return b"{}"


async def test_fuzz_1200_hostile_requests(tiny_model_dir, adapters_dir):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    sent = 0
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir, max_tokens_cap=64, max_n=4)) as c:
        async def one(i: int):
            path = rng.choice(PATHS)
            posts = path.startswith(("/chat", "/v1/c", "/v1/l", "/v1/u"))
            method = "POST" if posts and rng.random() < 0.9 else rng.choice(["POST", "GET", "PUT", "DELETE"])
            headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
            r = await c.request(method, path, content=_body(rng), headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, r.status_code, r.text[:300])
            if r.status_code >= 400 and path.startswith("/v1") and "%" not in path and ".." not in path:
                assert "error" in r.json() and r.json()["error"]["message"]
            if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                assert "Traceback" not in r.text

        for batch in range(60):
            await asyncio.gather(*[one(batch * 20 + i) for i in range(20)])
            sent += 20
        assert (await c.get("/health")).json() == {"status": "Healthy"}
        rt = c.app.state.runtime
        assert rt.engine.error is None and rt.engine.step_failures == 0
        ok = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200
    assert sent >= 1000
    assert statuses.get(200, 0) > 50 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 500, statuses
    assert not math.isnan(sum(statuses.values()))
    print("fuzz statuses", sorted(statuses.items()))


POSTS_WEIGHT = 3  # generation endpoints get 3 cases for each one of a GET


async def test_5000_cases_from_the_openapi_schema_over_every_endpoint(tiny_model_dir, adapters_dir):
    """Cases drawn from the app's own OpenAPI document (valid, or one mutation away) on every operation: no
    5xx, no error inside a 200 stream, the engine never fails a step, and a normal request is answered after."""
    # max_tokens_cap keeps every accepted generation short; loading adapters stays off (an `image` would pull).
    settings = settings_for(tiny_model_dir, adapters_dir, max_tokens_cap=8, default_max_tokens=4, max_n=2,
                            max_batch_size=16, enable_lora_loading=False)
    async with asgi_client(settings) as c:
        fuzz = SchemaFuzzer(c.app.openapi(), seed=20261202)
        ops = fuzz.operations
        assert {(o.method, o.path) for o in ops} >= {("POST", "/chat"), ("POST", "/v1/completions"),
                                                     ("POST", "/v1/chat/completions"), ("GET", "/health")}
        weighted = [o for o in ops for _ in range(POSTS_WEIGHT if o.method == "POST" else 1)]
        seen: Counter = Counter()
        t0 = time.monotonic()

        async def one(case):
            r = await c.request(case.op.method, case.url, content=case.content, headers=case.headers)
            assert r.status_code < 500, (case.op.path, case.content[:300] if case.content else None, r.status_code, r.text[:300])
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
                assert '"code":500' not in r.text and '"code": 500' not in r.text, r.text[-300:]
            seen[(case.op.method, case.op.path, r.status_code // 100 * 100, case.valid)] += 1

        sent = 0
        while sent < 5000:
            batch = [fuzz.case(fuzz.rng.choice(weighted)) for _ in range(25)]
            await asyncio.gather(*[one(x) for x in batch])
            sent += len(batch)
        elapsed = time.monotonic() - t0
        rt = c.app.state.runtime
        assert rt.engine.error is None and rt.engine.step_failures == 0
        assert (await c.get("/health")).json() == {"status": "Healthy"}
        ok = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    per_op, per_status = Counter(), Counter()
    for (method, path, status, _), n in seen.items():
        per_op[(method, path)] += n
        per_status[f"{method} {path} {status}"] += n
    assert set(per_op) == {(o.method, o.path) for o in ops} and min(per_op.values()) >= 30, per_op
    answered = {(m, p) for (m, p, s, _) in seen if s == 200}
    assert {("POST", "/chat"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= answered, answered
    print(f"{sent} schema cases in {elapsed:.1f} s;", sorted(per_status.items()))


@pytest.mark.slow
def test_schemathesis_sample_of_every_operation(tiny_model_dir, adapters_dir):
    """schemathesis' own (hypothesis) generation, valid and invalid, on every operation of the same schema."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis.errors import Unsatisfiable
    from hypothesis import settings as hsettings
    from schemathesis.generation.modes import GenerationMode

    from .conftest import LiveServer

    settings = settings_for(tiny_model_dir, adapters_dir, max_tokens_cap=8, default_max_tokens=4, max_n=2,
                            enable_lora_loading=False)
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        schema = schemathesis.openapi.from_dict(srv.app.openapi())
        ops = [r.ok() for r in schema.get_all_operations()]
        statuses: Counter = Counter()
        def run(op, mode) -> None:
            @hsettings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                       suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(mode))
            def check(case):
                kw = case.as_transport_kwargs(base_url=srv.url)
                kw.pop("cookies", None)
                r = client.request(kw.pop("method"), kw.pop("url"), **kw)
                statuses[(op.method.upper(), op.path, r.status_code // 100 * 100)] += 1
                assert r.status_code < 500, (op.path, kw, r.status_code, r.text[:300])

            try:
                check()
            except Unsatisfiable:  # parameterless GETs have no invalid form: nothing to send
                pass

        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run(op, mode)
        assert srv.runtime.engine.error is None and srv.runtime.engine.step_failures == 0
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert {(o.method.upper(), o.path) for o in ops} == {(m, p) for m, p, _ in statuses}
    assert sum(statuses.values()) >= 150, statuses
