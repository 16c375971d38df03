"""Tuning benchmark: sequence packing vs padding (tokens/s), and QLoRA vs LoRA peak memory.

Run by hand or by `make bench`; not by the tests. Each measurement runs in a
fresh subprocess (`--worker`) through the real job (`kaito.tuning.trainer.
run_tuning`), on an embedded preset (default `tiny-phi-3-small`) or any
`--model-dir`. Data: a dolly-style parquet with mixed answer lengths (most
short, every third one 6-12x longer), the shape where padding wastes most.

    .venv/bin/python bench/tuning.py                     # ~1-2 min on 2 idle CPU cores
    .venv/bin/python bench/tuning.py --rows 512 --steps 40 --preset tiny-phi-3-small

Throughput = answer+prompt tokens actually in the batches (no padding) per
second of `trainer.train()`. Memory: on CUDA, torch's peak allocated bytes;
on CPU, the process's peak RSS growth over the RSS after loading libraries,
plus the model's weight footprint (exact) for both methods.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tuning"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(a) -> dict:
    """One training run in this process; prints a JSON line."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401  (imported before the baseline so it is not counted)
    from kaito.tuning.trainer import run_tuning

    base_rss = _rss_mib()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quant = a.method == "qlora"
    doc = {
        "training_config": {
            "ModelConfig": {"torch_dtype": "bfloat16" if (cuda or quant) else "float32", "device_map": "auto"},
            "LoraConfig": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "TrainingArguments": {
                "output_dir": "/mnt/results", "save_strategy": "no", "max_steps": a.steps,
                "per_device_train_batch_size": a.batch, "learning_rate": 1e-3, "logging_steps": 10**6,
                "disable_tqdm": True,
            },
            "DatasetConfig": {"packing": a.packing, "max_seq_length": a.max_len, "shuffle_seed": 1},
        }
    }
    if quant:
        doc["training_config"]["QuantizationConfig"] = {
            "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        s = run_tuning(preset=a.preset, method=a.method, data=[a.data], output=out, config=doc,
                       model_dir=a.model_dir)
        wall = time.monotonic() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": a.method, "packing": a.packing, "tokens_per_s": s["tokens_per_s"], "steps": s["global_step"],
        "wall_s": round(wall, 1), "peak_rss_growth_mib": round(peak_rss - base_rss, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "weights_mib": s.get("weights_mib"),
    }


def run_worker(a, **over) -> dict:
    args = [sys.executable, __file__, "--worker", "--data", a.data, "--preset", a.preset, "--steps", str(a.steps),
            "--batch", str(a.batch), "--max-len", str(a.max_len)]
    if a.model_dir:
        args += ["--model-dir", a.model_dir]
    for k, v in over.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--data")
    p.add_argument("--preset", default="tiny-phi-3-small")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    from tuning_datagen import dolly_rows, write_parquet

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_parquet(data / "mixed.parquet", dolly_rows(a.rows, seed=1, long_every=3))
        a.data = str(data)
        print(f"preset {a.preset}, {a.rows} mixed-length rows, {a.steps} steps x batch {a.batch}, max_len {a.max_len}")
        padded = run_worker(a, method="lora")
        packed = run_worker(a, method="lora", packing=True)
        ratio = packed["tokens_per_s"] / padded["tokens_per_s"]
        print(f"tokens/s  packing (ours): {packed['tokens_per_s']:.0f}   padding (baseline, Kaito): "
              f"{padded['tokens_per_s']:.0f}   ratio {ratio:.2f}x  (goal >= 1.5x)")
        lora = packed  # same model, same data: the packed LoRA run doubles as the memory baseline
        qlora = run_worker(a, method="qlora", packing=True)
        key = "cuda_peak_mib" if lora["cuda_peak_mib"] is not None else "peak_rss_growth_mib"
        print(f"peak memory ({key}, training incl. load)  qlora: {qlora[key]} MiB   lora: {lora[key]} MiB   "
              f"ratio {qlora[key] / max(lora[key], 1e-9):.2f}")
        print(f"weights in memory  qlora: {qlora['weights_mib']} MiB   lora: {lora['weights_mib']} MiB")
        print(f"wall per run: padded {padded['wall_s']}s, packed lora {packed['wall_s']}s, packed qlora {qlora['wall_s']}s")


if __name__ == "__main__":
    main()
