"""Hostile traffic against the whole server: no request stops the engine, admission answers honestly, and
1 MiB prompts never stall /health (tokenization runs off the event loop)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from support.procs import stop_group

from .conftest import asgi_client, free_port, settings_for


async def test_empty_prompts_and_extreme_sampling_never_stop_the_engine(tiny_model_dir):
    async with asgi_client(settings_for(tiny_model_dir, max_batch_size=4, max_waiting=4)) as c:
        for _ in range(3):  # three empty prompts used to stop the engine for good
            r = await c.post("/chat", json={"prompt": ""})
            assert r.status_code in (400, 422) and "empty" in r.text
        extreme = [{"temperature": 1e-40}, {"top_p": 1e-46}, {"repetition_penalty": 1e-40}, {"top_k": 10**20}]
        for gk in extreme:  # refused at the edge or survived by the sampler: never a 5xx, never a dead engine
            r = await c.post("/chat", json={"prompt": "hi", "generate_kwargs": {**gk, "do_sample": True, "max_new_tokens": 3}})
            assert r.status_code < 500, r.text
        rt = c.app.state.runtime
        assert rt.engine.error is None and (await c.get("/health")).status_code == 200
        r = await c.post("/chat", json={"prompt": "What is a GPU?", "generate_kwargs": {"max_new_tokens": 4}})
        assert r.status_code == 200 and r.json()["Result"]


async def test_a_request_that_can_never_fit_gets_400_naming_the_limit(tiny_model_dir):
    async with asgi_client(settings_for(tiny_model_dir, max_batch_size=4, max_waiting=8, max_n=8)) as c:
        r = await c.post("/v1/completions", json={"prompt": ["hi"] * 64, "n": 8, "max_tokens": 2})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "512 sequences" in msg and "max_batch_size + max_waiting = 4 + 8" in msg
        assert "retry-after" not in r.headers
        r = await c.post("/v1/completions", json={"prompt": ["hi"] * 3, "n": 4, "max_tokens": 2})  # 12 rows: fits
        assert r.status_code == 200 and len(r.json()["choices"]) == 12
        rt = c.app.state.runtime  # finished rows leave the batch at the engine's next step
        deadline = time.time() + 10
        while (rt.engine.num_running or rt.engine.num_waiting) and time.time() < deadline:
            await asyncio.sleep(0.02)
        assert rt.engine.num_running == 0 and rt.engine.num_waiting == 0


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _probe_health(url: str, n: int, gap: float) -> list[float]:
    out = []
    with httpx.Client(timeout=10) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(gap)
    return out


@pytest.mark.slow
def test_health_stays_fast_while_clients_send_1mib_prompts(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kaito.runtime", "--preset", "tiny-phi-3", "--model-dir", str(tiny_model_dir),
                             "--adapters-dir", str(tmp_path / "none"), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        idle = _probe_health(url, 40, 0.02)
        # Just under the 1 MiB body limit: ~200k tokens, tokenized (about a second of CPU each), then refused.
        bodies = [json.dumps({"prompt": "word " * 209_000, "max_tokens": 2}).encode(),
                  json.dumps({"prompt": "word " * 209_000, "generate_kwargs": {"max_new_tokens": 2}}).encode()]
        assert all(len(b) < (1 << 20) for b in bodies)
        stop, answered = threading.Event(), []

        def client(i: int):
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    path = "/v1/completions" if i % 2 == 0 else "/chat"
                    r = c.post(url + path, content=bodies[i % 2], headers={"content-type": "application/json"})
                    answered.append(r.status_code)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(1.0)  # all four are uploading or tokenizing
            busy = _probe_health(url, 100, 0.03)
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=60)
        idle_p50, p99 = statistics.median(idle), _percentile(busy, 0.99)
        print(f"/health idle p50 {idle_p50 * 1000:.1f} ms, under 4 x 1 MiB prompts p99 {p99 * 1000:.1f} ms "
              f"max {max(busy) * 1000:.1f} ms; {len(answered)} big requests answered {sorted(set(answered))}")
        assert answered and all(s in (400, 422) for s in answered)  # too long: refused (after tokenizing, or by size)
        assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms under load (idle p50 {idle_p50 * 1000:.1f} ms)"
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        stop_group(proc, timeout=20)
        log.close()


@pytest.mark.parametrize("kind", ["prefill", "decode"])
async def test_one_bad_request_among_good_ones_over_http(tiny_model_dir, kind):
    """Seven concurrent requests, one of whose rows breaks the forward (injected at the engine's forward
    boundary): the six good ones answer 200 with their usual text, the bad one 500, the server stays healthy."""
    async with asgi_client(settings_for(tiny_model_dir, max_batch_size=8)) as c:
        rt = c.app.state.runtime
        tok = rt.loaded.tokenizer
        bad_ids = tok("this request breaks the model")["input_ids"]

        def hook(k, rows):
            if k == kind and any(r.prompt_ids == bad_ids and (k == "prefill" or len(r.output_ids) >= 2) for r in rows):
                raise RuntimeError("injected row fault")

        prompts = ["What is a GPU?", "hi", "Explain batching.", "Numbers 0 1 2 3", "The quick brown fox", "Why quantize?"]
        body = lambda p: {"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        alone = [(await c.post("/v1/completions", json=body(p))).json()["choices"][0]["text"] for p in prompts]
        rt.engine.fault_hook = hook
        rs = await asyncio.gather(*[c.post("/v1/completions", json=body(p)) for p in
                                    prompts[:3] + ["this request breaks the model"] + prompts[3:]])
        codes = [r.status_code for r in rs]
        assert codes == [200, 200, 200, 500, 200, 200, 200], [r.text[:200] for r in rs]
        assert [r.json()["choices"][0]["text"] for r in rs[:3] + rs[4:]] == alone
        assert rt.engine.error is None and (await c.get("/health")).status_code == 200


async def test_a_device_fault_reaches_the_process_exit_hook(tiny_model_dir):
    """An unrecoverable fault (a CUDA error here, injected) fails the request, turns /health 503 and calls the
    runtime's on_fatal, which `kaito.runtime.launch` turns into a non-zero process exit."""
    async with asgi_client(settings_for(tiny_model_dir)) as c:
        rt = c.app.state.runtime
        reasons: list[str] = []
        rt.on_fatal = reasons.append

        def hook(kind, rows):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        rt.engine.fault_hook = hook
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 500
        for _ in range(100):  # the hook runs on the engine thread right after the requests got their error
            if reasons:
                break
            await asyncio.sleep(0.02)
        assert len(reasons) == 1 and "engine stopped" in reasons[0] and "CUDA error" in reasons[0]
        assert (await c.get("/health")).status_code == 503


ENGINE_FAULT_SERVER = """
import sys
from kaito.runtime import launch
from kaito.runtime.serving import Runtime

real_load = Runtime.load

def load(self):  # the test's fault injection: every decode forward hits a CUDA error once the model is up
    real_load(self)
    def hook(kind, rows):
        if kind == "decode":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    self.engine.fault_hook = hook

Runtime.load = load
sys.exit(launch.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_unrecoverable_engine_fault_ends_the_server_process_non_zero(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_FAULT_SERVER, "--preset", "tiny-phi-3", "--model-dir",
                             str(tiny_model_dir), "--adapters-dir", str(tmp_path / "none"), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 500
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - t0
        err = proc.stderr.read().decode()
        assert code == 1 and "the engine stopped" in err and "CUDA error" in err, err[-2000:]
        assert took < 15, f"the process took {took:.1f} s to exit after its engine died"
        print(f"process exited {took:.1f} s after the engine died")
    finally:
        if proc.poll() is None:
            stop_group(proc, timeout=20)
