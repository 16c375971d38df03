"""Adapter image: pushed with a dockerconfigjson to a real loopback registry, pulled back, loaded by PeftModel.
Also: data from an image input, no push of an incomplete adapter, credentials never printed."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import numpy as np
import pytest
import torch
import yaml
from kaito import image_builder
from kaito.presets.cli import main as kaito_main
from kaito.presets.errors import KaitoError
from kaito.tuning import DIGEST_FILE, SENTINEL, default_config_text
from kaito.tuning.output import push_adapter
from peft import PeftModel
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM


def short_config(tmp_path):
    doc = yaml.safe_load(default_config_text("lora"))
    doc["training_config"]["ModelConfig"]["torch_dtype"] = "float32"
    doc["training_config"]["TrainingArguments"].update({"max_steps": 3, "learning_rate": 1e-2})
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def tune_and_push(tmp_path, data_dir, model_dir, out, ref, secret) -> int:
    """`kaito tune` of the short lora config on the tiny preset, pushing the adapter to `ref`."""
    argv = ["tune", "--config", str(short_config(tmp_path)), "--preset", "tiny-phi-3", "--method", "lora"]
    argv += ["--data", str(data_dir), "--output", str(out), "--model-dir", str(model_dir)]
    return kaito_main(argv + ["--push", ref, "--push-secret", str(secret)])


def test_push_pull_and_load_adapter(auth_registry, dolly_parquet, model_copy, tmp_path, capsys):
    secret = auth_registry.dockerconfig(tmp_path / "config.json")
    ref = f"{auth_registry.host}/adapters/tiny-phi-3-dolly:0.0.1"
    out = tmp_path / "results"
    rc = tune_and_push(tmp_path, dolly_parquet.parent, model_copy, out, ref, secret)
    captured = capsys.readouterr()
    assert rc == 0
    recorded = (out / DIGEST_FILE).read_text().strip()
    assert recorded.startswith(f"{auth_registry.host}/adapters/tiny-phi-3-dolly@sha256:")
    digest = recorded.split("@")[1]
    # stdout is the JSON summary alone (`| jq` works); the logs, upload URLs included, are on stderr
    assert json.loads(captured.out)["digest"] == digest
    assert "s3cret" not in captured.out + captured.err and "_state=" not in captured.out + captured.err

    pulled = tmp_path / "pulled"
    res = image_builder.pull(ref, pulled, auth_file=secret)
    assert res.digest == digest
    assert sorted(p.name for p in pulled.iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (out / name).read_bytes()
    manifest = httpx.get(
        f"{auth_registry.url}/v2/adapters/tiny-phi-3-dolly/manifests/0.0.1",
        auth=("kaito", "s3cret-pa55word"),
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    assert manifest["annotations"]["sh.kaito.model.name"] == "tiny-phi-3"

    base = AutoModelForCausalLM.from_pretrained(model_copy)
    ids = torch.tensor([[1, 7, 20, 30, 40, 5]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(pulled))
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the pulled adapter is live


def test_incomplete_adapter_is_never_pushed(registry, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    ref = f"{registry.host}/adapters/half:1"
    with pytest.raises(KaitoError, match="is not complete; not pushing it"):
        push_adapter(out, ref, preset_name="tiny-phi-3")
    assert not (out / DIGEST_FILE).exists() and not (out / SENTINEL).exists()
    r = httpx.get(f"{registry.url}/v2/adapters/half/manifests/1")
    assert r.status_code == 404


def test_the_same_adapter_pushed_twice_has_one_digest(registry, tmp_path):
    """A push is reproducible: staging dir names, file times and tags never reach the manifest digest."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q"]}))
    rng = np.random.default_rng(0)
    save_file(
        {
            "base_model.model.q.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            "base_model.model.q.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        },
        str(out / "adapter_model.safetensors"),
    )
    (out / SENTINEL).write_text("Fine-tuning completed\n")  # no training: push_adapter only needs a complete dir
    first = push_adapter(out, f"{registry.host}/adapters/twice:1", preset_name="tiny-phi-3")
    again = push_adapter(out, f"{registry.host}/adapters/twice:1", preset_name="tiny-phi-3")
    # the same bytes from another directory, with other mtimes, to another tag
    other = tmp_path / "elsewhere"
    shutil.copytree(out, other, copy_function=shutil.copy)
    for f in other.iterdir():
        os.utime(f, (1_000_000_000, 1_000_000_000))
    moved = push_adapter(other, f"{registry.host}/adapters/twice:2", preset_name="tiny-phi-3")
    assert first == again == moved
    assert (out / DIGEST_FILE).read_text().strip() == f"{registry.host}/adapters/twice@{first}"
    for tag in ("1", "2"):
        r = httpx.head(
            f"{registry.url}/v2/adapters/twice/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == first


def test_wrong_push_secret_fails_without_leaking(auth_registry, dolly_parquet, model_copy, tmp_path, capsys):
    secret = auth_registry.dockerconfig(tmp_path / "bad.json", password="wrong-password-xyz")
    out = tmp_path / "results"
    rc = tune_and_push(tmp_path, dolly_parquet.parent, model_copy, out, f"{auth_registry.host}/adapters/x:1", secret)
    captured = capsys.readouterr()
    assert rc in (1, 2)
    assert "wrong-password-xyz" not in captured.out + captured.err
    # training completed and is kept; no digest was recorded
    assert (out / SENTINEL).is_file() and not (out / DIGEST_FILE).exists()
    # a rerun with the right secret only pushes: no training again
    good = auth_registry.dockerconfig(tmp_path / "good.json")
    rc = tune_and_push(tmp_path, dolly_parquet.parent, model_copy, out, f"{auth_registry.host}/adapters/x:1", good)
    assert rc == 0
    assert '"skipped_training": true' in capsys.readouterr().out and (out / DIGEST_FILE).is_file()


def test_data_from_an_image(registry, dolly_parquet, tmp_path):
    ref = f"{registry.host}/datasets/dolly:1"
    image_builder.push_dir(dolly_parquet.parent, ref)
    dest = tmp_path / "mnt-data"
    assert kaito_main(["tune", "fetch-data", "--dest", str(dest), f"image:{ref}"]) == 0
    assert (dest / dolly_parquet.name).read_bytes() == dolly_parquet.read_bytes()
