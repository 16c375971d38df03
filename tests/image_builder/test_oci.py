"""The pure OCI library: references, reproducible layers, immutable images, layouts (checked by skopeo)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from kaito.image_builder.oci import Layer, append, empty_image, parse_reference
from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import BadReference, InvalidInput, OCIError
from kaito.image_builder.oci.image import validate
from kaito.image_builder.oci.layer import TarEntry, stream_segments
from kaito.image_builder.oci.layout import Layout


@pytest.mark.parametrize(
    "ref, registry, repo, tag, digest",
    [
        ("127.0.0.1:5000/kaito-phi:0.1.0", "127.0.0.1:5000", "kaito-phi", "0.1.0", None),
        ("mcr.microsoft.com/aks/kaito/kaito-phi-3:0.1.1", "mcr.microsoft.com", "aks/kaito/kaito-phi-3", "0.1.1", None),
        ("localhost/a/b@sha256:" + "a" * 64, "localhost", "a/b", None, "sha256:" + "a" * 64),
        ("ubuntu", "registry-1.docker.io", "library/ubuntu", None, None),
    ],
)
def test_registry_references(ref, registry, repo, tag, digest):
    r = parse_reference(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert not r.is_layout


def test_layout_references_use_skopeo_syntax(tmp_path):
    r = parse_reference(f"oci:{tmp_path}/x:v1")
    assert r.is_layout and r.path == tmp_path / "x" and r.tag == "v1"
    assert str(r) == f"oci:{tmp_path}/x:v1"


@pytest.mark.parametrize("bad", ["", "host:5000/UPPER:tag", "host/repo@sha256:short", "host/repo:bad tag"])
def test_bad_references_name_the_problem(bad):
    with pytest.raises(BadReference) as e:
        parse_reference(bad, "--ref")
    assert "--ref" in str(e.value)


def _members(layer: Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer.read_bytes())) as t:
        return t.getmembers()


def test_file_layer_is_reproducible_tar(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"\x01" * 1000)
    a = Layer.from_file(f, "workspace/weights/w.safetensors", cache=False)
    f.touch()  # mtime changes; content and digest must not
    b = Layer.from_file(f, "workspace/weights/w.safetensors", cache=False)
    assert a.digest == b.digest and a.size == len(a.read_bytes())
    ms = _members(a)
    assert [m.name for m in ms] == ["workspace", "workspace/weights", "workspace/weights/w.safetensors"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in ms)
    assert [oct(m.mode) for m in ms] == ["0o755", "0o755", "0o644"]
    assert V.sha256_digest(a.read_bytes()) == a.digest == a.diff_id


def test_dir_layer_sorted_and_long_names(tmp_path):
    long = "d" * 120
    (tmp_path / long).mkdir()
    (tmp_path / long / "z.json").write_text("{}")
    (tmp_path / "a.txt").write_text("a")
    layer = Layer.from_dir(tmp_path, "workspace/weights")
    names = [m.name for m in _members(layer)]
    assert names == sorted(names)
    assert f"workspace/weights/{long}/z.json" in names  # PAX header carries the long name


@pytest.mark.parametrize("compression, media", [("gzip", V.OCI_LAYER_GZIP), ("zstd", V.OCI_LAYER_ZSTD)])
def test_compressed_code_layers_are_deterministic(compression, media):
    files = {"workspace/tfs/run.py": b"print('hi')\n" * 100}
    a = Layer.from_bytes(files, compression=compression)
    b = Layer.from_bytes(files, compression=compression)
    assert a.media_type == media and a.digest == b.digest and a.diff_id != a.digest
    assert a.diff_id == Layer.from_bytes(files).digest  # diff id = digest of the uncompressed tar


@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), offset=st.integers(0, 4000))
def test_streaming_from_any_offset(data, offset):
    layer = Layer.from_bytes({"f": data})
    whole = layer.read_bytes()
    assert b"".join(layer.open(offset)) == whole[offset:]


def test_append_is_functional_and_reproducible(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    base = empty_image()
    layer = Layer.from_file(f, "workspace/weights/x")
    one = append(base, [layer], env={"A": "1"}, labels={"l": "v"}, annotations={"k": "v"})
    two = append(base, [layer], env={"A": "1"}, labels={"l": "v"}, annotations={"k": "v"})
    assert base.layers == () and base.config["rootfs"]["diff_ids"] == []
    assert one.digest == two.digest and one.manifest_bytes == two.manifest_bytes
    assert one.config["rootfs"]["diff_ids"] == [layer.diff_id]
    assert one.config["config"]["Env"] == ["A=1"]
    stacked = append(one, [layer], env={"A": "2"})
    assert stacked.config["config"]["Env"] == ["A=2"] and len(stacked.layers) == 2
    assert one.config["config"]["Env"] == ["A=1"]  # the earlier value is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.layers = ()  # frozen
    validate(stacked)


def test_validator_catches_diff_id_mismatch(tmp_path):
    img = append(empty_image(), [Layer.from_bytes({"a": b"1"})])
    broken = img.derive(layers=img.layers + (Layer.from_bytes({"b": b"2"}),))
    with pytest.raises(OCIError, match="diff ids"):
        validate(broken)


def test_docker_schema2_manifests_are_read():
    cfg = {"mediaType": V.DOCKER_CONFIG, "digest": "sha256:" + "1" * 64, "size": 3}
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": V.DOCKER_MANIFEST,
            "config": cfg,
            "layers": [{"mediaType": V.DOCKER_LAYER_GZIP, "digest": "sha256:" + "2" * 64, "size": 9}],
        }
    ).encode()
    m = V.parse_manifest(raw)
    assert m.media_type == V.DOCKER_MANIFEST and m.layers[0].media_type == V.DOCKER_LAYER_GZIP
    idx = V.parse_manifest(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": V.DOCKER_LIST,
                "manifests": [
                    {
                        "mediaType": V.DOCKER_MANIFEST,
                        "digest": "sha256:" + "3" * 64,
                        "size": 1,
                        "platform": {"os": "linux", "architecture": "arm64"},
                    },
                    {
                        "mediaType": V.DOCKER_MANIFEST,
                        "digest": "sha256:" + "4" * 64,
                        "size": 1,
                        "platform": {"os": "linux", "architecture": "amd64"},
                    },
                ],
            }
        ).encode()
    )
    assert V.pick_platform(idx, arch="amd64").digest == "sha256:" + "4" * 64
    assert V.pick_platform(idx, arch="arm64").digest == "sha256:" + "3" * 64


def test_layout_roundtrip_and_skopeo_reads_it(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"w" * 5000)
    lay = Layout(tmp_path / "layout")
    layer = Layer.from_file(f, "workspace/weights/w.safetensors", digester=lay.digester, have=lay.has_blob)
    img = append(empty_image(), [layer], annotations={"sh.kaito.model.name": "tiny-phi-3"})
    lay.write_image(img, "v1")
    back = lay.read_image("v1")
    assert back.digest == img.digest and back.layers[0].read_bytes() == layer.read_bytes()
    out = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:v1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["Digest"] == img.digest and info["Layers"] == [layer.digest]
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'layout'}:v1"], capture_output=True)
    assert raw.stdout == img.manifest_bytes
    with pytest.raises(OCIError, match="tags: v1"):
        lay.read_image("nope")


def test_layout_ingest_verifies_expected_digest(tmp_path):
    lay = Layout(tmp_path / "l")
    with pytest.raises(OCIError, match="expected"):
        lay.ingest([b"abc"], expect="sha256:" + "0" * 64)
    assert not any((tmp_path / "l" / "blobs" / "sha256").iterdir())  # nothing half-valid left


def test_a_file_entry_with_no_content_is_named():
    with pytest.raises(InvalidInput, match="tar entry data/x: a file entry needs `source`"):
        Layer.from_entries([TarEntry("data/x", "file")])


def test_a_layout_index_entry_that_is_itself_an_index_is_refused(tmp_path):
    lay = Layout(tmp_path / "l")
    inner = json.dumps({"schemaVersion": 2, "mediaType": V.OCI_INDEX, "manifests": []}).encode()
    platform = {"os": "linux", "architecture": V.host_arch()}
    entry = {"mediaType": V.OCI_MANIFEST, "digest": lay.ingest([inner]), "size": len(inner), "platform": platform}
    outer = json.dumps({"schemaVersion": 2, "mediaType": V.OCI_INDEX, "manifests": [entry]}).encode()
    top = {"mediaType": V.OCI_INDEX, "digest": lay.ingest([outer]), "size": len(outer)}
    (tmp_path / "l" / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [{**top, "annotations": {V.ANN_REF_NAME: "t"}}]})
    )
    with pytest.raises(
        OCIError, match=re.escape(f"oci:{tmp_path / 'l'}:t: the index entry {entry['digest']} is itself an index")
    ):
        lay.read_image("t")


def test_stream_segments_detects_shrinking_source(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(b"x" * 10000)
    layer = Layer.from_file(f, "big", cache=False)
    f.write_bytes(b"x" * 10)
    with pytest.raises(OCIError, match="shrank"):
        b"".join(stream_segments(layer.segments))


@pytest.mark.parametrize(
    "registry, layout",
    [
        ("out/registry", True),
        ("./x", True),
        ("oci:/tmp/r", True),
        ("127.0.0.1:5000", False),
        ("mcr.microsoft.com/aks/kaito", False),
        ("localhost/kaito", False),
        ("docker.io/me", False),
    ],
)
def test_registry_argument_path_or_host(registry, layout):
    from kaito.image_builder.oci.reference import image_ref_for

    ref = image_ref_for(registry, "kaito-tiny-phi-3", "0.1.0")
    assert ref.is_layout == layout
    if layout:
        assert ref.path.name == "kaito-tiny-phi-3" and ref.tag == "0.1.0"
    else:
        assert str(ref).endswith("/kaito-tiny-phi-3:0.1.0")
