"""How often a build+push reads each weight file: hashed once, sent once per image that carries it, never re-read to verify."""

from __future__ import annotations

import builtins
from collections import Counter
from pathlib import Path

import pytest

from kaito.image_builder import Layer, build_preset
from kaito.image_builder.oci import values as V
from kaito.image_builder.oci import layer as layer_mod
from support.registry import start_registry


def _spy(monkeypatch, root: Path) -> Counter:
    """Bytes read from each file under `root` through the layer module (where every blob byte is read)."""
    got: Counter = Counter()
    real_open = builtins.open

    class Counting:
        def __init__(self, f, name):
            self.f, self.name = f, name

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, *a):
            b = self.f.read(*a)
            got[self.name] += len(b)
            return b

        def readinto(self, buf):
            n = self.f.readinto(buf)
            got[self.name] += n or 0
            return n

        def __getattr__(self, k):
            return getattr(self.f, k)

    def spy_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        p = Path(path)
        if "r" in mode and root in p.parents:
            return Counting(f, p.name)
        return f

    monkeypatch.setattr(layer_mod, "open", spy_open, raising=False)
    return got


@pytest.fixture
def empty_registry(tmp_path):
    """A registry of its own: the shared one may already hold these blobs, and a skipped blob is not read."""
    server = start_registry(tmp_path / "registry")
    yield server
    server.stop()


def test_build_and_push_reads_each_weight_file_once_to_hash_and_once_to_send(empty_registry, weights_dir, monkeypatch):
    registry = empty_registry
    got = _spy(monkeypatch, weights_dir.resolve())
    res = build_preset("tiny-phi-3", registry.host, tag="reads", weights_dir=weights_dir, modelpack=False)
    sizes = {p.name: p.stat().st_size for p in weights_dir.iterdir()}
    assert res.bytes_uploaded >= sum(sizes.values())  # everything really went up
    for name, size in sizes.items():
        assert size <= got[name] <= 2 * size, (name, got[name], size)  # hash pass + the verifying send
    # A rebuild of unchanged files reads nothing: digests from the cache, blobs already there.
    got.clear()
    again = build_preset("tiny-phi-3", registry.host, tag="reads", weights_dir=weights_dir, modelpack=False)
    assert (again.digest, again.bytes_uploaded) == (res.digest, 0)
    assert sum(got.values()) == 0, dict(got)


def test_build_with_the_modelpack_hashes_each_file_once_for_both_images(empty_registry, weights_dir, monkeypatch):
    got = _spy(monkeypatch, weights_dir.resolve())
    res = build_preset("tiny-phi-3", empty_registry.host, tag="reads", weights_dir=weights_dir)
    assert res.modelpack_digest is not None
    sizes = {p.name: p.stat().st_size for p in weights_dir.iterdir()}
    assert res.bytes_uploaded >= 2 * sizes["model.safetensors"]  # both images really went up
    for name, size in sizes.items():
        assert 2 * size <= got[name] <= 3 * size, (name, got[name], size)  # one hash pass + one send per image
    # the digests of describing each image on its own (what a build into a layout does)
    solo = build_preset("tiny-phi-3", str(weights_dir.parent / "layout"), tag="reads", weights_dir=weights_dir)
    assert (solo.digest, solo.modelpack_digest) == (res.digest, res.modelpack_digest)


def test_one_file_as_two_tar_layers_is_read_once(weights_dir, monkeypatch):
    got = _spy(monkeypatch, weights_dir.resolve())
    f = weights_dir / "model.safetensors"
    image_layer, modelpack_layer = Layer.from_file_variants(
        f, [("workspace/weights/model.safetensors", {"a": "1"}), ("model.safetensors", None)], cache=False
    )
    assert got["model.safetensors"] == f.stat().st_size
    assert image_layer.annotations == {"a": "1"} and modelpack_layer.annotations == {}
    # the same digests as describing each separately
    assert image_layer.digest == Layer.from_file(f, "workspace/weights/model.safetensors", cache=False).digest
    assert modelpack_layer.digest == Layer.from_file(f, "model.safetensors", cache=False).digest
    assert V.sha256_digest(modelpack_layer.read_bytes()) == modelpack_layer.digest
