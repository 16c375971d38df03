"""torchrun with gloo, 2 CPU processes: rank 0 serves and broadcasts each step; output equals one process, and
one bad request fails alone on every rank while the group goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from support.procs import stop_group

from .conftest import asgi_client, free_port, settings_for

PROMPTS = ["What is a GPU?", "hi", "Explain batching in one sentence.", "The quick brown fox"]


async def _outputs(base_url: str, client: httpx.AsyncClient | None = None) -> list[str]:
    c = client or httpx.AsyncClient(base_url=base_url, timeout=60)
    bodies = [{"prompt": p, "max_tokens": 8 + 4 * i, "temperature": 0, "ignore_eos": True,
               "model": "alpha" if i % 2 else "tiny-phi-3"} for i, p in enumerate(PROMPTS)]
    rs = await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])
    chat = await c.post("/chat", json={"prompt": "What is a GPU?", "generate_kwargs": {"do_sample": False, "max_new_tokens": 10}})
    if client is None:
        await c.aclose()
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json()["choices"][0]["text"] for r in rs] + [chat.json()["Result"]]


def _port_pair() -> int:
    """A port that is free with the next one (rank 1's health server), below Linux's ephemeral range, where
    outgoing connections (gloo opens many) never take port + 1 between this check and rank 1's bind."""
    import random
    import socket

    while True:
        port = random.randrange(20000, 32000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


@contextlib.asynccontextmanager
async def torchrun_server(tmp_path, tiny_model_dir, adapters_dir, *extra: str, env: dict | None = None,
                          timeout: float = 120, procs: list | None = None):
    """2 ranks of `python -m kaito.runtime` under torchrun; yields (rank 0's URL, rank 1's health URL) once
    both answer /health, and stops the process group after. `procs`, when given, receives the torchrun process."""
    port = _port_pair()
    master = free_port()
    while master == port + 1:  # rank 1's health server listens on port + 1
        master = free_port()
    log = open(tmp_path / "torchrun.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(master), "-m", "kaito.runtime", "--preset", "tiny-phi-3", "--model-dir", str(tiny_model_dir),
         "--adapters-dir", str(adapters_dir), "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True)
    try:
        url, worker = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health").status_code == 200 and httpx.get(worker + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
        else:
            raise AssertionError("torchrun server not healthy:\n" + (tmp_path / "torchrun.log").read_text()[-3000:])
        if procs is not None:
            procs.append(proc)
        yield url, worker
    finally:
        if proc.poll() is None:
            stop_group(proc, timeout=30)
        log.close()


@pytest.mark.slow
async def test_two_process_torchrun_matches_one_process(tiny_model_dir, adapters_dir, tmp_path):
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir)) as c:
        expected = await _outputs("", c)
    async with torchrun_server(tmp_path, tiny_model_dir, adapters_dir, "--device", "cpu",
                               env={"OMP_NUM_THREADS": "1"}) as (url, worker):
        assert httpx.get(worker + "/health").json() == {"status": "Healthy"}
        got = await _outputs(url)
        assert got == expected
        info = httpx.get(worker + "/worker").json()
        assert info["rank"] == 1 and info["steps"] > 20 and info["adapters"] == ["alpha", "beta"]


@pytest.mark.slow
async def test_a_lost_peer_ends_every_rank_non_zero_within_seconds(tiny_model_dir, adapters_dir, tmp_path):
    """A rank that dies (OOM-killed, node lost) must not leave rank 0 answering: the whole group exits
    non-zero within seconds, so Kubernetes restarts the pod (never one rank Healthy and another dead)."""
    import signal

    procs: list = []
    async with torchrun_server(tmp_path, tiny_model_dir, adapters_dir, "--device", "cpu",
                               env={"OMP_NUM_THREADS": "1"}, procs=procs) as (url, worker):
        proc = procs[0]
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200
        os.kill(httpx.get(worker + "/worker").json()["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        # Rank 0 keeps receiving requests while the group goes down: none may hang.
        while time.monotonic() - t0 < 60 and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
            await asyncio.sleep(0.2)
        gone = time.monotonic() - t0
        assert proc.returncode not in (None, 0), proc.returncode
    assert gone < 30, f"the torchrun group was still alive {gone:.0f} s after losing rank 1"
    print(f"group gone {gone:.1f} s after rank 1 was killed")


BAD_AT_PREFILL, BAD_AT_DECODE, DEVICE_FAULT = "this request breaks the prefill", "this request breaks the decode", "boom"


@pytest.mark.slow
async def test_one_bad_request_among_good_ones_under_torchrun(tiny_model_dir, adapters_dir, tmp_path):
    """KAITO_TEST_FAULT, read by both ranks, makes every forward over the bad prompt's row raise on every rank
    (at prefill for one prompt, at decode for the other): the good requests sent with it answer 200 with their
    usual text, the bad one 500, and both ranks stay up, healthy and in lock-step for the requests after. A
    device fault (a CUDA error, injected the same way) then still ends the whole group non-zero."""
    prompts = ["What is a GPU?", "hi", "Explain batching.", "Numbers 0 1 2 3", "The quick brown fox", "Why quantize?"]
    body = lambda p: {"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with asgi_client(settings_for(tiny_model_dir, adapters_dir)) as c:
        alone = [(await c.post("/v1/completions", json=body(p))).json()["choices"][0]["text"] for p in prompts]
    procs: list = []
    fault = json.dumps({"prefill": BAD_AT_PREFILL, "decode": BAD_AT_DECODE, "device": DEVICE_FAULT})
    log = tmp_path / "torchrun.log"
    # Admissions unbounded by the decode's time: arrivals during a decode step are prefilled together.
    async with torchrun_server(tmp_path, tiny_model_dir, adapters_dir, "--device", "cpu", "--prefill-step-ratio", "0",
                               procs=procs, env={"OMP_NUM_THREADS": "1", "KAITO_TEST_FAULT": fault}) as (url, worker):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for i in range(8):  # both kinds, then until the bad prompt shared a prefill (arrivals' timing varies)
                if i >= 2 and "prefilling each alone" in log.read_text():
                    break
                bad = BAD_AT_DECODE if i == 1 else BAD_AT_PREFILL
                # A long request decodes meanwhile, so the others arrive during its steps and share forwards.
                blocker = asyncio.ensure_future(c.post("/v1/completions", json={**body(prompts[0]), "max_tokens": 64}))
                await asyncio.sleep(0.3)
                rs = await asyncio.gather(*[c.post("/v1/completions", json=body(p)) for p in prompts[:3] + [bad] + prompts[3:]])
                assert (await blocker).status_code == 200
                assert [r.status_code for r in rs] == [200, 200, 200, 500, 200, 200, 200], [r.text[:200] for r in rs]
                assert [r.json()["choices"][0]["text"] for r in rs[:3] + rs[4:]] == alone, bad
            steps = httpx.get(worker + "/worker").json()["steps"]
            rs = await asyncio.gather(*[c.post("/v1/completions", json=body(p)) for p in prompts])
            assert [r.json()["choices"][0]["text"] for r in rs] == alone
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(worker + "/health").json() == {"status": "Healthy"}
            assert httpx.get(worker + "/worker").json()["steps"] > steps and procs[0].poll() is None
            text = log.read_text()
            assert "prefilling each alone" in text and "decoding each alone" in text
            assert text.count("waiting for rank 0's retries") >= 4  # rank 1's copies of the failed forwards
            r = await c.post("/v1/completions", json=body(DEVICE_FAULT))
            assert r.status_code == 500
        t0 = time.monotonic()
        while procs[0].poll() is None and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.2)
        assert procs[0].returncode not in (None, 0), log.read_text()[-3000:]
    print(f"group gone {time.monotonic() - t0:.1f} s after a device fault; rank 0 retried "
          f"{text.count('prefilling each alone')} prefill(s) and {text.count('decoding each alone')} decode(s) row by row")


def test_a_worker_replays_rank_0s_retries_whatever_its_own_forward_did(tiny_model_dir):
    """In process, a worker's Replayer against a rank-0 executor: a decode that succeeded only on the worker is
    taken back when rank 0's next plan says its own failed (the caches then decode alike); a forward that
    failed only on the worker ends it (SystemExit), never a silent divergence."""
    import torch
    from kaito.runtime.distributed import Replayer
    from kaito.runtime.executor import BatchExecutor
    from kaito.runtime.loader import load
    from kaito.runtime.plan import StepPlan, prefill_plan
    from kaito.runtime.settings import RuntimeSettings

    loaded = load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))
    rank0, worker = BatchExecutor(loaded.model), Replayer(BatchExecutor(loaded.model))
    prompts = [loaded.tokenizer(p)["input_ids"] for p in ("What is a GPU?", "hi", "Numbers 0 1 2 3")]
    rank0.prefill(prompts, [()] * 3)
    worker.replay(prefill_plan(0, [(p, ()) for p in prompts]))
    worker.replay(StepPlan(keep=(0, 1, 2), decode=(5, 6, 7)))  # rank 0's copy of this decode failed
    worker.replay(StepPlan(keep=(1, 0, 2), decode=(6,), after_fault=True))  # its retry of row 1 alone
    rank0.evict([1, 0, 2])
    rank0.decode([6])
    assert (worker.ex.width, worker.ex.pos.tolist()) == (rank0.width, rank0.pos.tolist())
    torch.testing.assert_close(worker.ex.decode([9, 8, 7]), rank0.decode([9, 8, 7]))

    def fault(kind, rows):
        raise RuntimeError("only on this rank")
    worker.fault = fault
    worker.replay(StepPlan(keep=(0, 1, 2), decode=(1, 2, 3)))  # fails here, swallowed for now
    with pytest.raises(SystemExit, match="failed here .* but not on rank 0"):
        worker.replay(StepPlan(keep=(0, 1, 2), decode=(1, 2, 3)))  # rank 0's had succeeded


async def test_a_worker_reports_rank_0s_health(tmp_path):
    """A worker rank's /health follows rank 0's (a real HTTP server stands in for rank 0 here)."""
    import http.server
    import threading

    from kaito.runtime.distributed import health_app

    answer = {"code": 200, "body": b'{"status": "Healthy"}'}

    class Rank0(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answer["code"])
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Rank0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ready = threading.Event()
    app = health_app(ready, {"steps": 0, "adapters": []}, f"http://127.0.0.1:{server.server_port}/health")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as c:
            assert (await c.get("/health")).json()["status"] == "Loading"  # this rank is still loading
            ready.set()
            assert (await c.get("/health")).json() == {"status": "Healthy"}
            answer.update(code=503, body=b'{"status": "Unhealthy"}')  # rank 0's engine died
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "Unhealthy" and "rank 0 answers 503" in r.json()["detail"]
            server.shutdown()
            server.server_close()  # rank 0 gone
            r = await c.get("/health")
            assert r.status_code == 503 and "rank 0 does not answer" in r.json()["detail"]
    finally:
        server.server_close()
