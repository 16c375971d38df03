"""Serving benchmark: kaito.runtime vs a Kaito-classic server, 1/8/32 concurrent streaming clients.

Run: `.venv/bin/python bench/serving.py` (defaults finish in about a minute on 2 CPU cores).
Bigger: `--concurrency 1 8 32 64 --requests-per-client 16 --output-len 128 --level-timeout 60`.

Both servers run in their own process (torch threads = --threads, default 1 for both) on 127.0.0.1 (one at a time, so they never share the CPU)
with the `small` tiny model (kaito.presets.make_tiny) or --model-dir:
  * ours:     `python -m kaito.runtime` (continuous batching), clients stream /v1/completions (SSE);
  * baseline: what Kaito's HF runtime was: FastAPI with a sync endpoint calling one
              `transformers.pipeline("text-generation")` per request (no batching, no streaming),
              clients POST /chat. Without streaming a client's first token arrives with the whole
              answer, so its TTFT is the full latency and TPOT is latency / output tokens.
Each level sends `requests-per-client x concurrency` requests (fixed prompt, fixed output length,
EOS ignored) and stops issuing new ones after --level-timeout seconds. Reported: req/s, output tok/s,
TTFT p50/p99, TPOT p50 (= (latency - TTFT) / (tokens - 1), vLLM's definition) and the ratios.
Every client starts its first request at the same instant, so each level opens with a burst: the
first wave's TTFT is also printed apart (p50/p99). With fixed output lengths, clients served together
stay in lock-step afterwards unless the server spreads them; our runtime's prefill thread takes one
prompt per forward while the batch decodes, so later arrivals meet a short queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Explain batching in one sentence. In short, batching runs many requests through the model in one"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_server(model_dir: str, port: int) -> None:
    """Kaito-classic: one pipeline call per request inside a sync FastAPI endpoint (thread pool)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.set_num_threads(int(os.environ.get("KAITO_TORCH_THREADS", "0")) or torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "Healthy"}

    @app.post("/chat")
    def chat(body: dict):
        kw = {**body.get("generate_kwargs", {}), "pad_token_id": tok.eos_token_id}
        out = pipe(body["prompt"], **kw)
        return {"Result": "".join(o["generated_text"] for o in out)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _client_ours(c, url: str, n: int, out: list, deadline: float) -> None:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    first = True
    while time.monotonic() < deadline and out[0] > 0:
        out[0] -= 1
        t0, ttft, tokens = time.monotonic(), None, 0
        async with c.post(url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.monotonic() - t0
        lat = time.monotonic() - t0
        out[1].append((ttft if ttft is not None else lat, lat, tokens, first))
        first = False


async def _client_base(c, url: str, n: int, out: list, deadline: float) -> None:
    body = {"prompt": PROMPT, "return_full_text": False,
            "generate_kwargs": {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}}
    first = True
    while time.monotonic() < deadline and out[0] > 0:
        out[0] -= 1
        t0 = time.monotonic()
        async with c.post(url + "/chat", json=body) as r:
            r.raise_for_status()
            await r.read()
        lat = time.monotonic() - t0
        out[1].append((lat, lat, n, first))
        first = False


async def run_level(kind: str, url: str, conc: int, per_client: int, n: int, timeout: float) -> dict:
    # aiohttp, as vLLM's benchmark_serving: the load generator shares the 2 cores with the server under
    # test, and httpx spends about twice its CPU per streamed chunk, which the server then lacks.
    import aiohttp

    out = [conc * per_client, []]
    deadline = time.monotonic() + timeout
    fn = _client_ours if kind == "ours" else _client_base
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=conc + 4)) as c:
        t0 = time.monotonic()
        await asyncio.gather(*[fn(c, url, n, out, deadline) for _ in range(conc)])
        wall = time.monotonic() - t0
    res = out[1]
    tpot = [(lat - ttft) / (tok - 1) if kind == "ours" else lat / tok for ttft, lat, tok, _ in res if tok > 1]
    burst = [r[0] for r in res if r[3]]
    return {"n": len(res), "req_s": len(res) / wall, "tok_s": sum(r[2] for r in res) / wall,
            "ttft_p50": _pct([r[0] for r in res], 50), "ttft_p99": _pct([r[0] for r in res], 99),
            "tpot_p50": _pct(tpot, 50), "burst_p50": _pct(burst, 50), "burst_p99": _pct(burst, 99)}


def start(cmd: list[str], url: str, log: Path, threads: int) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "KAITO_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(p)
    raise SystemExit("server did not become healthy in 120 s")


def stop(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, help="model to serve (default: make_tiny size=small in a temp dir)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=8,
                    help="each client's first request starts with all the others (the burst, reported apart as 'first wave'); the rest measure steady serving")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--level-timeout", type=float, default=15.0, help="stop issuing requests after this many seconds per level")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both servers (1: no OpenMP stalls on busy CPUs)")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.baseline_server:
        baseline_server(str(a.model_dir), a.port)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="kaito-bench-"))
    try:
        return _bench(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(a: argparse.Namespace, tmp: Path) -> int:
    model_dir = a.model_dir
    if model_dir is None:
        from kaito.presets import make_tiny

        model_dir = make_tiny(tmp / "small", size="small")
    results: dict[str, dict[int, dict]] = {}
    for kind in ("ours", "baseline"):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        if kind == "ours":
            cmd = [sys.executable, "-m", "kaito.runtime", "--model-dir", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
                   "--adapters-dir", str(tmp / "none"), "--max-batch-size", str(max(a.concurrency)), "--log-level", "warning"]
        else:
            cmd = [sys.executable, __file__, "--baseline-server", "--model-dir", str(model_dir), "--port", str(port)]
        p = start(cmd, url, tmp / f"{kind}.log", a.threads)
        try:
            asyncio.run(run_level(kind, url, 1, 1, 8, 30))  # warm-up
            results[kind] = {}
            for conc in a.concurrency:
                r = asyncio.run(run_level(kind, url, conc, a.requests_per_client, a.output_len, a.level_timeout))
                results[kind][conc] = r
                print(f"{kind:8s} c={conc:3d} n={r['n']:3d}  req/s {r['req_s']:7.2f}  out tok/s {r['tok_s']:8.1f}  "
                      f"TTFT p50 {r['ttft_p50'] * 1e3:8.1f} ms  p99 {r['ttft_p99'] * 1e3:8.1f} ms  TPOT p50 {r['tpot_p50'] * 1e3:6.2f} ms  "
                      f"(first wave: TTFT p50 {r['burst_p50'] * 1e3:.1f} ms, p99 {r['burst_p99'] * 1e3:.1f} ms)",
                      flush=True)
        finally:
            stop(p)
    print("\nratio (ours / baseline; TTFT: baseline / ours)")
    for conc in a.concurrency:
        o, b = results["ours"][conc], results["baseline"][conc]
        print(f"c={conc:3d}  req/s x{o['req_s'] / b['req_s']:.1f}  out tok/s x{o['tok_s'] / b['tok_s']:.1f}  "
              f"TTFT p50 x{b['ttft_p50'] / o['ttft_p50']:.1f}  TPOT p50 x{b['tpot_p50'] / o['tpot_p50']:.1f}")
    hi, lo = max(a.concurrency), min(a.concurrency)
    o = results["ours"]
    print(f"\ngoal: out tok/s at c={hi} >= 20x baseline: x{o[hi]['tok_s'] / results['baseline'][hi]['tok_s']:.1f}; "
          f"TTFT p50 at c={hi} <= 3x c={lo}: {o[hi]['ttft_p50'] / o[lo]['ttft_p50']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
