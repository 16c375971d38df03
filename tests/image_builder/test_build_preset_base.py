"""`kaito image build-preset` puts the weights on the runtime base by default (issue 12, point 4).

The base is --base / KAITO_BASE_IMAGE, else `<registry>/kaito-base:<version>`, else the layout
`make build-base` writes; with none of them the build fails with a line saying how to get one,
and nothing is written. A stand-in base image (one small layer, a config with an entrypoint)
is built here with the OCI library; the real Dockerfiles/base runs in tests/e2e/test_container.py.
"""

from __future__ import annotations

import json

import pytest

from kaito.image_builder import Connection, Layer, append, empty_image, read_image, write_image
from kaito.presets.images import BASE_REPOSITORY
from kaito.presets import __version__ as VERSION
from kaito.presets.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["image", "build-preset", "tiny-phi-3", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _stand_in_base(ref: str) -> list[str]:
    """A small image standing for Dockerfiles/base at `ref`; returns its layer digests."""
    layer = Layer.from_bytes({"opt/venv/bin/kaito-stand-in": b"#!/bin/sh\n"})
    with Connection() as conn:
        write_image(append(empty_image(), [layer], env={"PATH": "/opt/venv/bin:/usr/bin"}), ref, conn)
        return [x.digest for x in read_image(ref, conn).layers]


def test_without_any_base_the_build_fails_saying_how_to_get_one(capsys, tmp_path, weights_dir, monkeypatch):
    monkeypatch.delenv("KAITO_BASE_IMAGE", raising=False)
    monkeypatch.chdir(tmp_path)  # no out/registry/kaito-base here
    reg = tmp_path / "reg"
    rc, out, err = _run(capsys, "--registry", str(reg), "--weights", str(weights_dir))
    assert rc == 2, out + err
    err = " ".join(err.split())  # the root CLI wraps long error lines
    assert "make build-base" in err and "--base" in err and "KAITO_BASE_IMAGE" in err
    assert f"{BASE_REPOSITORY}:{VERSION}" in err and "Traceback" not in err
    assert not (reg / "kaito-tiny-phi-3").exists()  # never a silent weights-only image


@pytest.mark.parametrize("where", ["registry", "make-build-base-layout"])
def test_default_build_reuses_the_base_by_digest_and_serves(capsys, tmp_path, weights_dir, monkeypatch, where):
    monkeypatch.delenv("KAITO_BASE_IMAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    reg = tmp_path / "reg"
    base_dir = reg if where == "registry" else tmp_path / "out" / "registry"
    base_ref = f"oci:{base_dir}/{BASE_REPOSITORY}:{VERSION}"
    base_layers = _stand_in_base(base_ref)
    rc, out, err = _run(capsys, "--registry", str(reg), "--weights", str(weights_dir), "--tag", "b1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["base"] and res["base"].endswith(f"{BASE_REPOSITORY}:{VERSION}")
    with Connection() as conn:
        img = read_image(res["ref"], conn)
    layers = [x.digest for x in img.layers]
    assert layers[: len(base_layers)] == base_layers and len(layers) > len(base_layers)
    config = json.loads(img.config_bytes)["config"]
    # The image's default command serves the preset it carries.
    assert config["Entrypoint"] == ["python", "-m", "kaito.runtime"]
    assert "KAITO_PRESET=tiny-phi-3" in config["Env"] and "KAITO_MODEL_DIR=/workspace/weights" in config["Env"]
    assert "PATH=/opt/venv/bin:/usr/bin" in config["Env"]  # the base's environment is kept


def test_weights_only_is_explicit_and_excludes_a_base(capsys, tmp_path, weights_dir, monkeypatch):
    monkeypatch.delenv("KAITO_BASE_IMAGE", raising=False)
    reg = tmp_path / "reg"
    rc, out, err = _run(capsys, "--registry", str(reg), "--weights", str(weights_dir), "--weights-only", "--json")
    assert rc == 0, err
    assert json.loads(out)["base"] is None
    monkeypatch.setenv("KAITO_BASE_IMAGE", f"oci:{reg}/{BASE_REPOSITORY}:{VERSION}")
    rc, out, err = _run(capsys, "--registry", str(reg), "--weights", str(weights_dir), "--weights-only")
    assert rc == 2 and "--weights-only" in " ".join(err.split())


def test_default_base_is_the_image_the_operator_runs():
    """Seam: build-preset's default base in a registry is the operator's base/puller image."""
    from kaito.image_builder.build import default_base_refs
    from kaito.operator.settings import OperatorSettings

    settings = OperatorSettings(registry="127.0.0.1:5000/kaito")
    assert default_base_refs("127.0.0.1:5000/kaito")[0] == settings.base_image == settings.puller
