"""Kill and resume: a SIGKILLed tuning process resumes from its last complete checkpoint and ends at
the same adapter as an uninterrupted run; checkpoints are atomic; no sentinel before the adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from kaito.tuning import SENTINEL
from kaito.tuning.trainer import STAGING, complete_checkpoints, run_tuning
from safetensors.torch import load_file


def resume_config(tmp_path: Path) -> Path:
    doc = {
        "training_config": {
            "ModelConfig": {"torch_dtype": "float32", "local_files_only": True, "device_map": "auto"},
            "LoraConfig": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "TrainingArguments": {
                "output_dir": "/mnt/results", "save_strategy": "steps", "save_steps": 4, "max_steps": 24,
                "per_device_train_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 4, "seed": 7,
                "save_total_limit": 3,
            },
            "DatasetConfig": {"shuffle_dataset": True, "shuffle_seed": 3},
        }
    }
    p = tmp_path / "resume.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_sigkill_then_resume_matches_uninterrupted(dolly_parquet, model_copy, tmp_path):
    cfg = resume_config(tmp_path)
    data = str(dolly_parquet.parent)
    common = dict(preset="tiny-phi-3", method="lora", data=[data], config=cfg, model_dir=model_copy)

    straight = tmp_path / "straight"
    run_tuning(output=straight, **common)

    killed = tmp_path / "killed"
    env = dict(os.environ, KAITO_TUNING_STEP_DELAY_S="0.25")
    cmd = [sys.executable, "-m", "kaito.tuning", "--config", str(cfg), "--preset", "tiny-phi-3", "--method", "lora",
           "--data", data, "--output", str(killed), "--model-dir", str(model_copy)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (killed / "checkpoint-8").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-8 within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing claims completion, and every visible checkpoint is whole
    assert not (killed / SENTINEL).exists() and not (killed / "adapter_model.safetensors").exists()
    ckpts = complete_checkpoints(killed)
    assert ckpts and all((c / "adapter_model.safetensors").is_file() and (c / "trainer_state.json").is_file()
                         for c in ckpts)
    last_before = int(ckpts[-1].name.split("-")[1])
    assert last_before < 24

    summary = run_tuning(output=killed, **common)
    assert summary["resumed_from"] == str(killed / f"checkpoint-{last_before}")
    assert summary["global_step"] == 24
    assert (killed / SENTINEL).is_file() and not (killed / STAGING).exists()

    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)
    # and training did move the adapter (lora_B starts at zero)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)


def test_half_written_checkpoint_is_never_resumed(dolly_parquet, model_copy, tmp_path):
    """A staging folder left by a kill during a save is ignored and cleared; the run starts afresh."""
    cfg = resume_config(tmp_path)
    out = tmp_path / "out"
    (out / STAGING / "checkpoint-4").mkdir(parents=True)
    (out / STAGING / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"half")
    doc = yaml.safe_load(cfg.read_text())
    doc["training_config"]["TrainingArguments"]["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(doc))
    summary = run_tuning(preset="tiny-phi-3", method="lora", data=[str(dolly_parquet.parent)], output=out,
                         config=cfg, model_dir=model_copy)
    assert summary["resumed_from"] is None and summary["global_step"] == 4
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-4"]
    assert not (out / STAGING).exists()


def test_ddp_two_ranks_with_torchrun(dolly_parquet, model_copy, tmp_path):
    """DDP through torchrun (gloo on CPU here, NCCL on GPUs): both ranks train one model, rank 0 writes."""
    doc = yaml.safe_load(resume_config(tmp_path).read_text())
    doc["training_config"]["TrainingArguments"].update({"max_steps": 4, "save_steps": 4})
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kaito.tuning", "--config", str(cfg),
           "--preset", "tiny-phi-3", "--method", "lora", "--data", str(dolly_parquet.parent), "--output", str(out),
           "--model-dir", str(model_copy)]
    # Own process group: on a timeout the workers die with torchrun instead of lingering.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / SENTINEL).is_file()
    ckpt = out / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    import json

    state = json.loads((ckpt / "trainer_state.json").read_text())
    # 4 steps x 2 ranks x batch 2 = 16 of the 32 rows: half an epoch (one process would do a quarter)
    assert state["epoch"] == 0.5
    assert r.stdout.count('"global_step": 4') == 1  # one summary, from rank 0
