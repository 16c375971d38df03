"""The tiny model factory: deterministic, offline, loadable and generating."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from kaito.presets import InvalidInput, make_tiny


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_deterministic_byte_identical(tmp_path):
    a = make_tiny(tmp_path / "a")
    b = make_tiny(tmp_path / "b")
    assert _digests(a) == _digests(b)
    assert set(_digests(a)) >= {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                                "generation_config.json"}
    c = make_tiny(tmp_path / "c", seed=1)
    assert _digests(c)["model.safetensors"] != _digests(a)["model.safetensors"]


def test_sizes(tmp_path):
    tiny = make_tiny(tmp_path / "t")
    assert sum(p.stat().st_size for p in tiny.iterdir()) < 2 * 1024 * 1024
    small = make_tiny(tmp_path / "s", size="small")
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] == 4


def test_files_world_readable(tmp_path):
    d = make_tiny(tmp_path / "t")
    for p in d.iterdir():
        assert p.stat().st_mode & stat.S_IROTH, p
    assert d.stat().st_mode & stat.S_IXOTH


def test_refuses_to_overwrite_and_bad_size(tmp_path):
    d = make_tiny(tmp_path / "t")
    with pytest.raises(InvalidInput, match="exists"):
        make_tiny(d)
    with pytest.raises(InvalidInput, match="size 'huge'"):
        make_tiny(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
n = sum(p.numel() for p in model.parameters())
ids = tok.apply_chat_template([{"role": "user", "content": "What is Kubernetes?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
assert tok.decode(ids[0]).startswith("<|user|>\nWhat is Kubernetes?<|end|>\n<|assistant|>")
out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
print(n, out.shape[1] - ids.shape[1])
"""


@pytest.mark.parametrize("size,params", [("tiny", (100_000, 400_000)), ("small", (3_000_000, 5_000_000))])
def test_loads_offline_with_auto_classes_and_generates(tmp_path, size, params):
    d = make_tiny(tmp_path / size, size=size)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD, str(d)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n, new = map(int, out.stdout.split())
    assert params[0] < n < params[1]
    assert new == 8
