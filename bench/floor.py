"""The memory-bandwidth floor of a decode step at batch 1, measured on this machine now.

Called by `bench/serving.py` in a child process (so its thread count is the servers'), or alone:
`python bench/floor.py --bytes 352e6 --threads 1`. Decoding one token at batch 1 reads every weight
once, so no server can beat weight bytes / read bandwidth. Measured two ways over a buffer the size of
the model's weights: `sum` (a pure stream) and a GEMV (`F.linear` of one row, what a decode step's linears do),
taking the best of several runs; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def gemv_operands(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor's GEMV: one float32 weight of `nbytes` (rows of 1024) and one input row (also bench/decode_floor.py)."""
    cols = 1024
    return torch.randn(max(1, nbytes // 4 // cols), cols), torch.randn(1, cols)


def gemv_ms(w: torch.Tensor, x: torch.Tensor, n: int) -> float:
    """Mean ms of n GEMVs in a row, as many as the decode steps it is paired with (bench/serving.py `interleaved`,
    bench/decode_floor.py): a mean over the same stretch, not a best-of."""
    t = time.perf_counter()
    for _ in range(n):
        F.linear(x, w)
    return (time.perf_counter() - t) / n * 1e3


def measure(nbytes: int, threads: int, reps: int = 7) -> dict:
    torch.set_num_threads(threads)
    w, x = gemv_operands(nbytes)
    out = {}
    for name, fn in (("sum", lambda: w.sum()), ("gemv", lambda: F.linear(x, w))):
        fn()
        best = min(_timed(fn) for _ in range(reps))
        out[name + "_gbs"] = w.numel() * 4 / best / 1e9
    wb = w.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    F.linear(xb, wb)
    out["gemv_bf16_gbs"] = wb.numel() * 2 / min(_timed(lambda: F.linear(xb, wb)) for _ in range(reps)) / 1e9
    bw = max(out["sum_gbs"], out["gemv_gbs"])
    out["fp32_ms"] = nbytes / bw / 1e6
    out["bf16_ms"] = nbytes / 2 / max(bw, out["gemv_bf16_gbs"]) / 1e6
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=float, required=True, help="fp32 weight bytes of the model")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(measure(int(a.bytes), a.threads)))
