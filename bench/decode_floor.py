"""Our batch-1 decode step against the memory-bandwidth floor, in one process, interleaved round by round.

Called by `bench/serving.py` in a child process for each model (or alone:
`python bench/decode_floor.py --model-dir DIR --threads 2`). The served TPOT also carries the server's own
work per token (HTTP, SSE, the output processor, the event loop sharing the cores with the step); this
measures the engine's decode alone, so the two can be told apart. On a shared host whose memory bandwidth
drifts by a third between minutes, a floor measured before or after says little about one measured in the
same second: each round here times the step, then the floor's GEMV over a buffer of the model's weight bytes
(`floor.gemv_operands`), as many times in a row as steps were timed (a best-of over a few 16 ms calls would
pick the host's calmest instant against our average over half a second), and the ratio is taken per round.
Two paths of the step: a greedy run (`BatchExecutor.greedy_run`, what plain greedy streams take) and one step
at a time (`BatchExecutor.decode`, what sampled streams take). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from floor import gemv_ms, gemv_operands  # bench/ is this script's directory, first on sys.path

PROMPT = list(range(5, 21))


def measure(model_dir: Path, threads: int, rounds: int = 7, steps: int = 24) -> dict:
    from kaito.runtime.executor import BatchExecutor
    from kaito.runtime.loader import load
    from kaito.runtime.settings import RuntimeSettings

    torch.set_num_threads(threads)
    loaded = load(RuntimeSettings(model_dir=model_dir, device="cpu", dtype="float32"))
    ex = BatchExecutor(loaded.model)
    while ex.idle_layout():  # as a server does while idle: the dense layout batch 1 decodes on
        pass
    nbytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    w, x = gemv_operands(nbytes)
    flag = ctypes.c_int(0)
    out: dict[str, list[float]] = {"run_ms": [], "step_ms": [], "floor_ms": []}
    for r in range(rounds + 1):  # round 0 warms every path up and is dropped
        ex.prefill([PROMPT], [()])
        t = time.perf_counter()
        picks = ex.greedy_run([PROMPT[-1] + 1], steps, [], [False], 60.0, flag)
        run_ms = (time.perf_counter() - t) / steps * 1e3
        if picks is None or len(picks) != steps:
            raise RuntimeError(f"the greedy run did not run {steps} steps (got {picks!r}): not on the C step")
        tok = picks[-1][0]
        t = time.perf_counter()
        for _ in range(steps):
            tok = int(ex.decode([tok]).argmax(-1)[0])
        step_ms = (time.perf_counter() - t) / steps * 1e3
        ex.reset()
        F.linear(x, w)
        floor_ms = gemv_ms(w, x, steps)
        if r:
            out["run_ms"].append(run_ms)
            out["step_ms"].append(step_ms)
            out["floor_ms"].append(floor_ms)
    res = {k: statistics.median(v) for k, v in out.items()}
    res["run_ratio"] = statistics.median(a / b for a, b in zip(out["run_ms"], out["floor_ms"]))
    res["step_ratio"] = statistics.median(a / b for a, b in zip(out["step_ms"], out["floor_ms"]))
    res["run_ratio_range"] = [min(a / b for a, b in zip(out["run_ms"], out["floor_ms"])),
                              max(a / b for a, b in zip(out["run_ms"], out["floor_ms"]))]
    res["weight_mb"] = nbytes / 1e6
    res["rounds"] = rounds
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(json.dumps(measure(a.model_dir, a.threads, a.rounds)))
