"""A real uvicorn server on 127.0.0.1: the `openai` client (streaming and not) and client disconnects."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def oa(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_non_streaming_and_streaming(oa):
    kw = dict(model="tiny-phi-3", messages=[{"role": "user", "content": "What is a GPU?"}], max_tokens=10,
              temperature=0, extra_body={"ignore_eos": True})
    r = oa.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    text = r.choices[0].message.content
    stream = oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == text
    assert usage.completion_tokens == 10 and reasons[-1] == "length"


def test_openai_completions_models_and_adapter(oa):
    models = [m.id for m in oa.models.list()]
    assert models == ["tiny-phi-3", "alpha", "beta"]
    base = oa.completions.create(model="tiny-phi-3", prompt="hello", max_tokens=8, temperature=0, logprobs=2,
                                 extra_body={"ignore_eos": True})
    assert len(base.choices[0].logprobs.tokens) == 8 and len(base.choices[0].logprobs.top_logprobs[0]) == 2
    alpha = oa.completions.create(model="alpha", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert alpha.choices[0].text != base.choices[0].text
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model="alpha", prompt="hello", max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == alpha.choices[0].text
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="tiny-phi-3", prompt="x", max_tokens=5000)
    assert "max_tokens" in str(e.value)


def _wait_idle(rt, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rt.engine.num_running == 0 and rt.engine.num_waiting == 0:
            return True
        time.sleep(0.05)
    return False


def _aborted(url) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.split()[-1])
    return 0.0


def test_streaming_client_disconnect_cancels_and_frees_the_slot(live_server):
    rt = live_server.runtime
    before = _aborted(live_server.url)
    body = {"prompt": "hi", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", live_server.url + "/v1/completions", json=body) as s:
        it = s.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert rt.engine.num_running == 1
    assert _wait_idle(rt), "cancelled stream still holds its batch slot"
    assert _aborted(live_server.url) == before + 1
    assert rt.engine.ex.batch_size == 0 or all(s.finish_reason is None for s in rt.engine.running)


def test_non_streaming_client_disconnect_cancels(live_server):
    rt = live_server.runtime
    before = _aborted(live_server.url)
    payload = b'{"prompt": "hi", "max_tokens": 1000, "temperature": 0, "ignore_eos": true}'
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.time() + 10
        while rt.engine.num_running == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert rt.engine.num_running == 1
    assert _wait_idle(rt), "abandoned request kept running"
    assert _aborted(live_server.url) == before + 1
    assert httpx.get(live_server.url + "/health").json() == {"status": "Healthy"}
