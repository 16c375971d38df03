"""Third-party tools accept what we make: skopeo (inspect, copy both ways) and oras-py (pulls the ModelPack)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest

from kaito.image_builder import build_preset, inspect, pull

SKOPEO = ["skopeo", "--insecure-policy"]


def _skopeo(*args: str) -> str:
    r = subprocess.run([*SKOPEO, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_skopeo_inspects_and_copies_our_images(registry, weights_dir, tmp_path):
    b = build_preset("tiny-phi-3", registry.host, tag="sk", weights_dir=weights_dir)
    info = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{b.ref}"))
    assert info["Digest"] == b.digest
    assert info["Labels"]["sh.kaito.preset"] == "tiny-phi-3"
    assert (
        json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{b.modelpack_ref}"))["artifactType"]
        == "application/vnd.cncf.model.manifest.v1+json"
    )
    # registry -> layout (skopeo) -> our pull
    _skopeo("copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{b.ref}", f"oci:{tmp_path / 'sk'}:v1")
    got = pull(f"oci:{tmp_path / 'sk'}:v1", tmp_path / "w")
    assert (
        got.digest == b.digest
        and (tmp_path / "w" / "model.safetensors").read_bytes() == (weights_dir / "model.safetensors").read_bytes()
    )
    # our layout -> registry (skopeo) -> our inspect
    lay = build_preset("tiny-phi-3", str(tmp_path / "reg"), tag="sk", weights_dir=weights_dir, modelpack=False)
    assert lay.digest == b.digest  # same inputs, same digest, whatever the sink
    _skopeo(
        "copy", "--preserve-digests", "--dest-tls-verify=false", lay.ref, f"docker://{registry.host}/skopeo/copied:v1"
    )
    assert inspect(f"{registry.host}/skopeo/copied:v1")["digest"] == b.digest


def test_oras_py_pulls_the_modelpack(registry, weights_dir, tmp_path):
    oras_client = pytest.importorskip("oras.client")
    b = build_preset("tiny-phi-3", registry.host, tag="oras", weights_dir=weights_dir)
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    paths = client.pull(target=b.modelpack_ref, outdir=str(tmp_path / "oras"))
    assert paths, "oras pulled nothing"
    digests = {"sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    assert digests == {x["digest"] for x in inspect(b.modelpack_ref)["layers"]}
    names = set()
    for p in paths:
        with tarfile.open(p) as t:
            names |= {m.name for m in t.getmembers() if m.isfile()}
    assert names == {p.name for p in weights_dir.iterdir()}  # model-relative paths, as ModelPack reads them


def test_we_pull_what_oras_py_pushed(registry, tmp_path):
    oras_client = pytest.importorskip("oras.client")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\x00" * 5000 + b"weights")
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    import os

    cwd = os.getcwd()
    os.chdir(src)
    try:
        client.push(target=f"{registry.host}/oras/plain:v1", files=["model.safetensors"], disable_path_validation=True)
    finally:
        os.chdir(cwd)
    got = pull(f"{registry.host}/oras/plain:v1", tmp_path / "out")
    assert got.files == ("model.safetensors",)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
