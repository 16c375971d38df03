"""Pulling: content roots, atomic destinations, verification while streaming, safe extraction, reruns."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from kaito.image_builder import (
    Layer,
    OCIError,
    UnsafeLayer,
    VerificationError,
    append,
    build_adapter,
    build_preset,
    empty_image,
    pull,
    push,
)
from kaito.image_builder.oci import values as V
from kaito.image_builder.pull import MARKER
from kaito.presets.errors import InvalidInput
from support.tars import tar_bytes as _tar, tar_info as _info




def _image_with_raw_layer(tmp_path, data: bytes, tag: str = "v1") -> str:
    layer = Layer.blob(data, V.OCI_LAYER)
    img = append(empty_image(), [layer])
    ref = f"oci:{tmp_path / 'layout'}:{tag}"
    push(img, ref)
    return ref


def test_adapter_pull_strips_data_prefix(registry, adapter_dir, tmp_path):
    build_adapter(adapter_dir, f"{registry.host}/adapters/p:v1", preset_name="tiny-phi-3")
    res = pull(f"{registry.host}/adapters/p:v1", tmp_path / "mnt" / "adapter" / "p")
    dest = tmp_path / "mnt" / "adapter" / "p"
    assert sorted(res.files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (dest / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert not any(p.name.endswith("kaito-partial") for p in dest.parent.iterdir())


def test_preset_and_modelpack_pull_give_weights_dir(registry, weights_dir, tmp_path):
    b = build_preset("tiny-phi-3", registry.host, tag="pl", weights_dir=weights_dir)
    for ref, name in ((b.ref, "img"), (b.modelpack_ref, "mp")):
        res = pull(ref, tmp_path / name)
        want = sorted(p.name for p in weights_dir.iterdir())
        assert sorted(res.files) == want
        for f in want:
            assert (tmp_path / name / f).read_bytes() == (weights_dir / f).read_bytes()
    full = pull(b.ref, tmp_path / "rootfs", full=True)
    assert (tmp_path / "rootfs" / "workspace" / "weights" / "config.json").is_file()
    assert all(f.startswith("workspace/weights/") for f in full.files)


def test_pull_into_empty_mount_point_and_rerun_is_noop(registry, adapter_dir, tmp_path):
    build_adapter(adapter_dir, f"{registry.host}/adapters/m:v1")
    mnt = tmp_path / "weights"
    mnt.mkdir()  # like an emptyDir volume: it exists and cannot be renamed over
    first = pull(f"{registry.host}/adapters/m:v1", mnt)
    assert (mnt / "adapter_config.json").is_file() and (mnt / MARKER).is_file()
    assert not (mnt / ".kaito-partial").exists()
    again = pull(f"{registry.host}/adapters/m:v1", mnt)
    assert again.up_to_date and again.bytes_downloaded == 0 and again.digest == first.digest


def test_existing_foreign_destination_is_refused(registry, adapter_dir, tmp_path):
    build_adapter(adapter_dir, f"{registry.host}/adapters/f:v1")
    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    with pytest.raises(InvalidInput, match="--force"):
        pull(f"{registry.host}/adapters/f:v1", d)
    assert (d / "mine.txt").read_text() == "keep"
    pull(f"{registry.host}/adapters/f:v1", d, overwrite=True)
    assert not (d / "mine.txt").exists() and (d / "adapter_config.json").exists()


def _blob_file(registry, digest: str) -> Path:
    hex_ = digest.split(":")[1]
    return registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


def test_tampered_blob_is_refused_and_leaves_nothing(registry, tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(300_000))
    img = append(
        empty_image(),
        [Layer.from_file(f, "workspace/weights/w.safetensors")],
        annotations={V.ANN_CONTENT_ROOT: "workspace/weights"},
    )
    push(img, f"{registry.host}/tamper/a:v1")
    blob = _blob_file(registry, img.layers[0].digest)
    data = bytearray(blob.read_bytes())
    data[-2000] ^= 0xFF  # inside the file content, tar structure intact
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out"
    with pytest.raises(VerificationError, match="expected"):
        pull(f"{registry.host}/tamper/a:v1", dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if "kaito-partial" in p.name] == []


@pytest.mark.parametrize(
    "members, why",
    [
        ([(_info("../evil", size=3), b"bad")], "'..'"),
        ([(_info("/etc/evil", size=3), b"bad")], "absolute"),
        ([(_info("data/link", tarfile.SYMTYPE, linkname="../../../etc"), b"")], "escapes"),
        ([(_info("data/abs", tarfile.SYMTYPE, linkname="/etc/passwd"), b"")], "absolute path"),
        (
            [(_info("data/link", tarfile.SYMTYPE, linkname="."), b""), (_info("data/link/x", size=1), b"x")],
            "through the non-directory",
        ),
        ([(_info("data/sub", tarfile.SYMTYPE, linkname="../../outside"), b"")], "escapes"),
        ([(_info("data/dev", tarfile.CHRTYPE), b"")], "device"),
        ([(_info("data/fifo", tarfile.FIFOTYPE), b"")], "device file or FIFO"),
        ([(_info("data/hl", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")], "absolute"),
    ],
)
def test_malicious_layers_are_refused(tmp_path, members, why):
    ref = _image_with_raw_layer(tmp_path, _tar(*members))
    dest = tmp_path / "out"
    with pytest.raises(UnsafeLayer, match=why):
        pull(ref, dest)
    assert not dest.exists()
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil").exists()


def test_rootfs_mode_keeps_absolute_symlinks_but_never_writes_through_them(tmp_path):
    ok = _image_with_raw_layer(tmp_path, _tar((_info("bin", tarfile.SYMTYPE, linkname="/usr/bin"), b"")), "ok")
    pull(ok, tmp_path / "root", full=True)
    assert os.readlink(tmp_path / "root" / "bin") == "/usr/bin"
    evil = _image_with_raw_layer(
        tmp_path,
        _tar((_info("x", tarfile.SYMTYPE, linkname=str(tmp_path / "victim")), b""), (_info("x/owned", size=1), b"!")),
        "evil",
    )
    (tmp_path / "victim").mkdir()
    with pytest.raises(UnsafeLayer, match="through the non-directory"):
        pull(evil, tmp_path / "root2", full=True)
    assert not (tmp_path / "victim" / "owned").exists() and not (tmp_path / "root2").exists()
    (tmp_path / "victim" / "secret").write_text("s")
    hard = _image_with_raw_layer(
        tmp_path,
        _tar(
            (_info("x", tarfile.SYMTYPE, linkname=str(tmp_path / "victim")), b""),
            (_info("h", tarfile.LNKTYPE, linkname="x/secret"), b""),
        ),
        "hard",
    )
    with pytest.raises(UnsafeLayer, match="hard link"):
        pull(hard, tmp_path / "root3", full=True)
    assert not (tmp_path / "root3").exists() and os.stat(tmp_path / "victim" / "secret").st_nlink == 1


def test_rerun_skips_verified_layers(registry, tmp_path, fault_proxy):
    files = []
    for i in range(3):
        f = tmp_path / f"w{i}.safetensors"
        f.write_bytes(os.urandom(100_000))
        files.append(
            Layer.from_file(
                f, f"workspace/weights/w{i}.safetensors", annotations={V.MODEL_FILEPATH: f"w{i}.safetensors"}
            )
        )
    img = append(empty_image(), files, annotations={V.ANN_CONTENT_ROOT: "workspace/weights"})
    push(img, f"{registry.host}/rerun/a:v1")
    # The last layer's download fails for good on the first try (a 404 is not retried).
    fault_proxy.fail("GET", files[2].digest, 404, times=1)
    dest = tmp_path / "out"
    with pytest.raises(OCIError):
        pull(f"{fault_proxy.host}/rerun/a:v1", dest, jobs=1)
    assert not dest.exists()
    gets_before = [p for m, p, s in fault_proxy.log if m == "GET" and "/blobs/" in p]
    res = pull(f"{fault_proxy.host}/rerun/a:v1", dest, jobs=1)
    gets_after = [p for m, p, s in fault_proxy.log if m == "GET" and "/blobs/" in p][len(gets_before) :]
    blob_gets = [p for p in gets_after if img.config_blob.digest not in p]
    assert [files[2].digest in p for p in blob_gets] == [True]  # only the missing layer was fetched again
    assert res.bytes_downloaded == files[2].size
    assert sorted(res.files) == ["w0.safetensors", "w1.safetensors", "w2.safetensors"]


def test_whiteouts_apply_in_rootfs_mode(tmp_path):
    l1 = Layer.from_bytes({"etc/a": b"a", "etc/b": b"b"})
    l2 = Layer.blob(_tar((_info("etc/.wh.a"), b"")), V.OCI_LAYER)
    push(append(empty_image(), [l1, l2]), f"oci:{tmp_path / 'l'}:v1")
    res = pull(f"oci:{tmp_path / 'l'}:v1", tmp_path / "root", full=True)
    assert (tmp_path / "root" / "etc" / "b").exists() and not (tmp_path / "root" / "etc" / "a").exists()
    assert "etc/b" in res.files


def test_pull_marker_records_digest(registry, adapter_dir, tmp_path):
    r = build_adapter(adapter_dir, f"{registry.host}/adapters/mk:v1")
    pull(f"{registry.host}/adapters/mk:v1", tmp_path / "x")
    assert json.loads((tmp_path / "x" / MARKER).read_text())["digest"] == r.digest


def test_pull_retries_transient_failures(registry, adapter_dir, tmp_path, fault_proxy):
    r = build_adapter(adapter_dir, f"{registry.host}/adapters/flaky:v1")
    fault_proxy.fail("GET", "/blobs/sha256:", 503, times=2)
    got = pull(f"{fault_proxy.host}/adapters/flaky:v1", tmp_path / "out")
    assert got.digest == r.digest and [s for _, _, s in fault_proxy.log].count(503) == 2


def test_pull_by_digest_and_import_contract(registry, adapter_dir, tmp_path):
    import subprocess
    import sys

    r = build_adapter(adapter_dir, f"{registry.host}/adapters/pin:v1")
    got = pull(f"{registry.host}/adapters/pin@{r.digest}", tmp_path / "pinned")
    assert got.digest == r.digest
    code = (
        "import sys, kaito.image_builder, kaito.image_builder.cli, kaito.image_builder.pull; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_layer_cut_mid_download_is_fetched_again_then_given_up(registry, adapter_dir, tmp_path, fault_proxy):
    from kaito.image_builder.oci.errors import RegistryError
    from kaito.image_builder.transfer import inspect

    build_adapter(adapter_dir, f"{registry.host}/adapters/cut:v1")
    big = max(inspect(f"{registry.host}/adapters/cut:v1")["layers"], key=lambda x: x["size"])["digest"]
    fault_proxy.cut("GET", big, times=2)
    got = pull(f"{fault_proxy.host}/adapters/cut:v1", tmp_path / "out", retries=2)
    assert sorted(got.files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [s for _, p, s in fault_proxy.log if big in p].count("cut") == 2
    # One retry is not enough for two cuts: the network error reaches the caller, nothing is installed.
    fault_proxy.cut("GET", big, times=2)
    with pytest.raises(RegistryError, match="connection lost"):
        pull(f"{fault_proxy.host}/adapters/cut:v1", tmp_path / "again", retries=1)
    assert not (tmp_path / "again").exists()
