"""The ModelPack artifact against the ModelPack spec, its name across the builder/operator seam, reproducible pushes.

`_spec_extract` is written only from github.com/modelpack/model-spec (docs/spec.md:
manifest, media types, one tar per file; docs/annotations.md: `org.cncf.model.filepath`;
docs/config.md and schema/config-schema.json, copied into data/ at commit d78bf32),
using nothing of ours, so it stands for any other ModelPack consumer.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import httpx
import jsonschema
import pytest

from kaito.image_builder import build_adapter, build_preset
from kaito.presets import get_preset, list_presets
from kaito.presets.cli import main
from kaito.presets.images import modelpack_image, preset_image

SCHEMA = json.loads((Path(__file__).parent / "data" / "modelpack-config-schema.json").read_text())
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
CONFIG = "application/vnd.cncf.model.config.v1+json"
KINDS = ("weight", "weight.config", "doc", "code", "dataset")


def _spec_extract(registry_url: str, repo: str, tag: str, out: Path) -> dict:
    """Pull a ModelPack artifact with plain HTTP and tarfile, per the spec; returns its config."""
    with httpx.Client(base_url=registry_url, timeout=30) as c:
        m = c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST}).json()
        assert m["mediaType"] == MANIFEST and m["artifactType"] == ARTIFACT
        assert m["config"]["mediaType"] == CONFIG
        config = json.loads(c.get(f"/v2/{repo}/blobs/{m['config']['digest']}").content)
        jsonschema.validate(config, SCHEMA)
        diff_ids = []
        for layer in m["layers"]:
            kind, _, fmt = layer["mediaType"].removeprefix("application/vnd.cncf.model.").rpartition(".v1.")
            assert kind in KINDS and fmt in ("raw", "tar"), layer["mediaType"]
            blob = c.get(f"/v2/{repo}/blobs/{layer['digest']}").content
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
            diff_ids.append(layer["digest"])  # uncompressed: the diff id is the blob's digest
            path = layer["annotations"]["org.cncf.model.filepath"]
            if fmt == "raw":
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / path).write_bytes(blob)
                continue
            with tarfile.open(fileobj=io.BytesIO(blob)) as t:
                assert [x.name for x in t.getmembers() if x.isfile()] == [path]  # one file, at its filepath
                t.extractall(out, filter="data")
        assert config["modelfs"] == {"type": "layers", "diffIds": diff_ids}
    return config


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_spec_only_extractor_rebuilds_the_weights_directory(registry, weights_dir, tmp_path):
    (weights_dir / "sub").mkdir()
    (weights_dir / "sub" / "extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (weights_dir / "README.md").write_text("# tiny\n")
    b = build_preset("tiny-phi-3", registry.host, tag="spec", weights_dir=weights_dir)
    assert b.modelpack_ref == modelpack_image(registry.host, "tiny-phi-3", "spec")
    out = tmp_path / "spec-out"
    out.mkdir()
    config = _spec_extract(registry.url, "kaito-tiny-phi-3-weights", "spec", out)
    assert _tree(out) == _tree(weights_dir)  # byte for byte, same names
    assert config["descriptor"]["name"] == "tiny-phi-3" and config["config"]["format"] == "safetensors"


def test_builder_and_operator_name_the_same_artifact(registry, weights_dir, tmp_path, capsys):
    from kaito.operator import render
    from kaito.operator.settings import OperatorSettings

    tag = get_preset("tiny-phi-3").image_tag
    b = build_preset("tiny-phi-3", registry.host, tag=tag, weights_dir=weights_dir)
    assert b.ref == preset_image(registry.host, "tiny-phi-3", tag)
    ws = {
        "apiVersion": "kaito.sh/v1beta1",
        "kind": "Workspace",
        "metadata": {"name": "ws-tiny", "namespace": "default", "uid": "u-1"},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "tiny"}}},
        "inference": {"preset": {"name": "tiny-phi-3"}},
    }
    settings = replace(OperatorSettings(), registry=registry.host, weights_from_modelpack=True)
    objs = render.render(ws, settings, [])
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    init = next(c for c in pods[0]["initContainers"] if c["name"] == "weights")
    assert init["command"][:3] == ["kaito", "image", "pull"] and init["command"][3] == b.modelpack_ref
    rc = main([*init["command"][1:4], str(tmp_path / "workspace" / "weights"), "--quiet"])  # exactly what it runs
    assert rc == 0, capsys.readouterr().err
    assert _tree(tmp_path / "workspace" / "weights") == {
        **_tree(weights_dir),
        ".kaito-pull.json": (tmp_path / "workspace" / "weights" / ".kaito-pull.json").read_bytes(),
    }


def test_the_same_adapter_pushed_twice_from_different_directories_has_one_digest(registry, adapter_dir, tmp_path):
    again = tmp_path / ".push-x1y2z3"  # tuning stages a push in a fresh temporary directory each time
    shutil.copytree(adapter_dir, again)
    a = build_adapter(adapter_dir, f"{registry.host}/adapters/repro:v1", preset_name="tiny-phi-3")
    b = build_adapter(again, f"{registry.host}/adapters/repro:v2", preset_name="tiny-phi-3")
    assert a.digest == b.digest
    m = httpx.get(f"{registry.url}/v2/adapters/repro/manifests/v1", headers={"Accept": MANIFEST}).json()
    assert "x1y2z3" not in json.dumps(m)  # no directory name in any annotation


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_every_presets_modelpack_config_follows_the_schema(preset):
    from kaito.image_builder import Layer
    from kaito.image_builder.build import _modelpack

    layer = Layer.from_bytes({"config.json": b"{}"}).with_media_type(
        "application/vnd.oci.image.layer.v1.tar", {"org.cncf.model.filepath": "config.json"}
    )
    img = _modelpack(get_preset(preset), "0.0.1", [layer], {})
    jsonschema.validate(json.loads(img.config_bytes), SCHEMA)
    assert img.media_type == MANIFEST and img.artifact_type == ARTIFACT and img.config_media_type == CONFIG


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "x.pth", "x.pkl", "x.pickle", "x.ckpt"])
def test_weights_dir_with_a_pickle_is_refused(tmp_path, name):
    """The builder refuses every suffix of the one list (kaito.presets.weights.PICKLE_SUFFIXES)."""
    from kaito.image_builder.build import _split_files
    from kaito.presets.errors import InvalidInput

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidInput, match=f"{name} is a pickle checkpoint"):
        _split_files(tmp_path)
