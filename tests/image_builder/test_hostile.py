"""Hostile images (issue 12): crafted digests at every entry point, link chains, malformed tar/PAX/gzip/zstd/JSON.

Each case is refused with one error line naming the image and layer, exit 1,
no traceback, and leaves nothing behind: no destination, no staging, and a
sentinel directory placed where a crafted digest would point stays whole.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kaito.image_builder import OCIError, UnsafeLayer, pull
from kaito.image_builder.oci.errors import BadReference
from kaito.image_builder.oci.reference import parse_reference
from kaito.presets.cli import main
from support.tars import tar_bytes as _tar, tar_info as _info

EVIL = "sha256:../../../victim"
EMPTY_CFG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def _sha(b: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(b).hexdigest()


def _desc(mt: str, data: bytes, digest: str | None = None) -> dict:
    return {"mediaType": mt, "digest": digest or _sha(data), "size": len(data)}


def _manifest(layers: list[dict], config: dict | None = None) -> dict:
    cfg = config or _desc("application/vnd.oci.image.config.v1+json", EMPTY_CFG)
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": layers}


def _layout(d: Path, top: dict | bytes, blobs: list[bytes], tag: str = "v1", top_digest: str | None = None) -> str:
    """An OCI layout whose index.json names `top` (a manifest or index) under `tag`; blobs stored as given."""
    (d / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    raw = top if isinstance(top, bytes) else json.dumps(top).encode()
    for b in [raw, EMPTY_CFG, *blobs]:
        (d / "blobs" / "sha256" / _sha(b)[7:]).write_bytes(b)
    mt = "application/vnd.oci.image.index.v1+json" if b'"manifests"' in raw else "application/vnd.oci.image.manifest.v1+json"
    entry = {**_desc(mt, raw, top_digest), "annotations": {"org.opencontainers.image.ref.name": tag}}
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return f"oci:{d}:{tag}"




def _image(tmp: Path, *layers: bytes, mt: str = "application/vnd.oci.image.layer.v1.tar", name="lay") -> str:
    return _layout(tmp / name, _manifest([_desc(mt, x) for x in layers]), list(layers))


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """tmp/a/victim: where `staging/layers/<EVIL hex>` lands for a destination tmp/a/b/out."""
    v = tmp_path / "a" / "victim"
    v.mkdir(parents=True)
    (v / "keep").write_text("precious")
    (tmp_path / "a" / "b").mkdir()
    return v


def _nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if "kaito-partial" in p.name] == []


# --- 1. digests ------------------------------------------------------------------------------------
def _crafted(kind: str, tmp: Path) -> str:
    layer = _tar((_info("data/x", size=1), b"x"))
    if kind == "layer":  # manifest -> layer descriptor
        return _layout(tmp / "l", _manifest([_desc("application/vnd.oci.image.layer.v1.tar", layer, EVIL)]), [layer])
    if kind == "config":  # manifest -> config descriptor
        cfg = _desc("application/vnd.oci.image.config.v1+json", EMPTY_CFG, EVIL)
        return _layout(tmp / "l", _manifest([], cfg), [])
    if kind == "index":  # index -> manifest descriptor
        inner = _desc("application/vnd.oci.image.manifest.v1+json", b"{}", EVIL)
        return _layout(tmp / "l", {"schemaVersion": 2, "manifests": [inner]}, [])
    assert kind == "layout"  # index.json -> top descriptor
    return _layout(tmp / "l", _manifest([]), [], top_digest=EVIL)


@pytest.mark.parametrize("kind", ["layer", "config", "index", "layout"])
def test_crafted_digest_is_refused_at_every_descriptor(tmp_path, sentinel, kind):
    ref = _crafted(kind, tmp_path)
    dest = tmp_path / "a" / "b" / "out"
    with pytest.raises(OCIError, match=r"digest 'sha256:\.\./\.\./\.\./victim' is not sha256:<64"):
        pull(ref, dest)
    assert (sentinel / "keep").read_text() == "precious"
    _nothing_left(dest)


@pytest.mark.parametrize(
    "ref", ["127.0.0.1:5000/x@sha256:../../victim", "oci:/tmp/x@sha256:../../victim", "r.io/x@sha256:ABCD", "r.io/x@md5:0"]
)
def test_crafted_digest_in_a_reference_is_refused(ref):
    with pytest.raises(BadReference, match="digest"):
        parse_reference(ref)


class _HostileRegistry:
    """Serves one manifest whose layer digest is crafted, and logs every path asked for."""

    def __init__(self, manifest: bytes) -> None:
        self.paths: list[str] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                body = manifest if "/manifests/" in self.path else (EMPTY_CFG if "/blobs/" in self.path else b"{}")
                self.send_response(200 if "/manifests/" in self.path or self.path == "/v2/" or body == EMPTY_CFG else 404)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_crafted_digest_from_a_registry_never_reaches_a_url_or_path(tmp_path, sentinel):
    layer = _tar((_info("data/x", size=1), b"x"))
    reg = _HostileRegistry(json.dumps(_manifest([_desc("application/vnd.oci.image.layer.v1.tar", layer, EVIL)])).encode())
    try:
        dest = tmp_path / "a" / "b" / "out"
        with pytest.raises(OCIError, match="is not sha256:<64"):
            pull(f"{reg.host}/evil/img:v1", dest)
        assert not any(".." in p for p in reg.paths), reg.paths
        assert (sentinel / "keep").read_text() == "precious"
        _nothing_left(dest)
    finally:
        reg.httpd.shutdown()


async def test_runtime_adapter_load_refuses_crafted_digests_and_leaves_nothing(tmp_path, tiny_model_dir):
    """`POST /v1/load_lora_adapter` with an image: a crafted layer digest, a crafted reference, a corrupt layer."""
    import asyncio

    import httpx

    from kaito.runtime.api import build_app
    from kaito.runtime.settings import RuntimeSettings

    root = tmp_path / "root"
    pulled = root / "pulled"  # pulled/.<name>-<uuid>.kaito-partial/layers/../../../victim == root/victim
    pulled.mkdir(parents=True)
    victim = root / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    evil = _crafted("layer", tmp_path / "evil")
    corrupt = _image(tmp_path, MALFORMED["corrupt gzip"][0], mt="application/vnd.oci.image.layer.v1.tar+gzip")
    settings = RuntimeSettings(
        model_dir=tiny_model_dir, preset="tiny-phi-3", adapters_dir=tmp_path / "none", host="127.0.0.1",
        enable_lora_loading=True, adapter_pull_root=pulled,
    )
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(app.state.runtime.ready.wait, 60)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            for image, why in ((evil, "is not sha256:<64"), ("127.0.0.1:1/x@sha256:../../../victim", "digest"),
                               (corrupt, "corrupt gzip stream")):
                r = await c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "image": image})
                assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
                assert r.json()["error"]["param"] == "image"
    assert (victim / "keep").read_text() == "precious"
    assert list(pulled.iterdir()) == []  # no destination, no .evil-<uuid>.kaito-partial


# --- 2. links ---------------------------------------------------------------------------------------
CHAIN = [
    (_info("a/b/c/d/e/f/g/h/u", tarfile.SYMTYPE, linkname="../../../../../../../.."), b""),
    (_info("config.json", tarfile.SYMTYPE, linkname="a/b/c/d/e/f/g/h/u/../../../../../../../../../etc/passwd"), b""),
]


@pytest.mark.parametrize("order", ["as-in-the-issue", "reversed"])
def test_the_symlink_chain_from_the_issue_is_refused_in_any_order(tmp_path, order):
    members = CHAIN if order == "as-in-the-issue" else CHAIN[::-1]
    ref = _image(tmp_path, _tar(*members))
    dest = tmp_path / "out"
    with pytest.raises(UnsafeLayer, match="symlink 'config.json'.*escapes the destination"):
        pull(ref, dest)
    _nothing_left(dest)


def test_a_chain_split_across_layers_is_refused(tmp_path):
    """Layer 1 holds config.json (inside on paper while u is absent), layer 2 makes u: judged on the merged tree."""
    ref = _image(tmp_path, _tar(CHAIN[1]), _tar(CHAIN[0]))
    dest = tmp_path / "out"
    with pytest.raises(UnsafeLayer, match="config.json.*escapes the destination"):
        pull(ref, dest, full=True)
    _nothing_left(dest)


def test_links_inside_the_tree_still_work(tmp_path):
    ref = _image(
        tmp_path,
        _tar(
            (_info("w/model.safetensors", size=3), b"abc"),
            (_info("w/sub/u", tarfile.SYMTYPE, linkname=".."), b""),
            (_info("w/alias", tarfile.SYMTYPE, linkname="sub/u/model.safetensors"), b""),
            (_info("w/hard", tarfile.LNKTYPE, linkname="w/alias"), b""),
        ),
    )
    pull(ref, tmp_path / "out", full=True)
    assert (tmp_path / "out" / "w" / "alias").read_bytes() == b"abc" == (tmp_path / "out" / "w" / "hard").read_bytes()


# --- 3. malformed input: one line, exit 1, nothing left ------------------------------------------------
def _pax_member(records: bytes, name: str = "data/x", data: bytes = b"x") -> bytes:
    """A tar whose member has a hand-written PAX header (tarfile would refuse to write these)."""
    pax = _info("././@PaxHeader", tarfile.XHDTYPE, size=len(records))
    hdr = pax.tobuf(tarfile.USTAR_FORMAT)
    body = records + b"\0" * (-len(records) % 512)
    member = _info(name, size=len(data)).tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    return hdr + body + member + b"\0" * 1024


def _rec(key: bytes, val: bytes) -> bytes:
    body = b" " + key + b"=" + val + b"\n"
    n = len(body) + 1
    n = len(body) + len(str(n))
    return str(n).encode() + body


def _zstd(b: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(b)


GOOD = _tar((_info("data/x", size=1), b"x"))
MALFORMED = {
    "pax size=-1": (_pax_member(_rec(b"size", b"-1")), "tar+x", "PAX size '-1'"),
    "pax size=abc": (_pax_member(_rec(b"size", b"abc")), "tar+x", "PAX size 'abc'"),
    "pax bad record": (_pax_member(b"99 path=x\n"), "tar+x", "malformed PAX record"),
    "pax no length": (_pax_member(b"path=x\n"), "tar+x", "malformed PAX record"),
    "pax non-utf8 key": (_pax_member(_rec(b"\xff\xfe", b"v")), "tar+x", "is not UTF-8"),
    "corrupt gzip": (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 64, "tar+gzip", "corrupt gzip stream"),
    "truncated gzip": (gzip.compress(GOOD, mtime=0)[:-12], "tar+gzip", "gzip stream ends early"),
    "corrupt zstd": (b"\x28\xb5\x2f\xfd" + os.urandom(64), "tar+zstd", "corrupt zstd stream"),
    "truncated zstd": (_zstd(GOOD)[:-6], "tar+zstd", "zstd stream ends early"),
    "whiteout sub/.wh..": (_tar((_info("data/sub/.wh..", size=0), b"")), "tar+x", "malformed whiteout"),
    "whiteout sub/.wh...": (_tar((_info("data/sub/.wh...", size=0), b"")), "tar+x", "malformed whiteout"),
    "negative header size": (_info("x", size=0).tobuf(tarfile.GNU_FORMAT)[:124] + b"\xff" * 12
                             + _info("x").tobuf(tarfile.GNU_FORMAT)[136:], "tar+x", "bad tar header|negative size"),
}


def _media(kind: str) -> str:
    return {"tar+x": "application/vnd.oci.image.layer.v1.tar"}.get(kind, f"application/vnd.oci.image.layer.v1.{kind}")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_layers_end_in_one_line_exit_1_and_nothing_left(tmp_path, capsys, case):
    blob, kind, why = MALFORMED[case]
    ref = _image(tmp_path, blob, mt=_media(kind))
    dest = tmp_path / "out"
    rc = main(["image", "pull", ref, str(dest), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    import re

    assert re.search(why, err) and _sha(blob) in err and str(tmp_path / "lay") in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    _nothing_left(dest)


def test_pax_size_minus_one_does_not_spin(tmp_path):
    """The case that used to loop forever: a real process, a deadline, exit 1."""
    ref = _image(tmp_path, _pax_member(_rec(b"size", b"-1")))
    code = "import sys; from kaito.presets.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "image", "pull", ref, str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "PAX size '-1'" in p.stderr and "Traceback" not in p.stderr
    _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("index", [b"not json", b"\xff\xfe", b"[1, 2]", b'{"manifests": 3}'])
def test_a_broken_index_json_is_one_line(tmp_path, capsys, index):
    (tmp_path / "lay").mkdir()
    (tmp_path / "lay" / "index.json").write_bytes(index)
    rc = main(["image", "pull", f"oci:{tmp_path / 'lay'}:v1", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "index.json" in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# --- 3. limits and whiteouts ------------------------------------------------------------------------
def test_a_gzip_bomb_is_refused_under_the_default_limits(tmp_path):
    bomb = gzip.compress(_tar((_info("data/zeros", size=64 << 20), b"\0" * (64 << 20))), mtime=0)
    assert len(bomb) < 128 << 10  # 64 MiB from under 128 KiB
    ref = _image(tmp_path, bomb, mt="application/vnd.oci.image.layer.v1.tar+gzip")
    with pytest.raises(OCIError, match="expands more than 100x"):
        pull(ref, tmp_path / "out")
    _nothing_left(tmp_path / "out")
    from kaito.image_builder.oci.extract import ExtractLimits

    pull(ref, tmp_path / "out", limits=ExtractLimits(max_ratio=2000))  # a user who trusts the image
    assert (tmp_path / "out" / "zeros").stat().st_size == 64 << 20  # data/ is the content root


def test_total_bytes_limit_is_settable(tmp_path, capsys, monkeypatch):
    ref = _image(tmp_path, _tar((_info("data/a", size=3000), b"a" * 3000), (_info("data/b", size=3000), b"b" * 3000)))
    rc = main(["image", "pull", ref, str(tmp_path / "out"), "--quiet", "--max-bytes", "5000"])
    assert rc == 1 and "more than 5000 bytes" in capsys.readouterr().err
    monkeypatch.setenv("KAITO_PULL_MAX_BYTES", "4000")
    with pytest.raises(OCIError, match="more than 4000 bytes"):
        pull(ref, tmp_path / "out")
    _nothing_left(tmp_path / "out")
    monkeypatch.setenv("KAITO_PULL_MAX_BYTES", "6000")
    assert len(pull(ref, tmp_path / "out").files) == 2


def test_whiteouts_hide_lower_layers_only(tmp_path):
    """OCI image spec: `.wh.<name>` deletes <name> from lower layers; `.wh..wh..opq` empties the directory below,
    and both apply before the layer's own entries (which they never hide)."""
    low = _tar((_info("d/a", size=1), b"a"), (_info("d/b", size=1), b"b"), (_info("e/x", size=1), b"x"))
    up = _tar((_info("-new", size=1), b"n"), (_info("d/.wh.a", size=0), b""), (_info("e/-y", size=1), b"y"),
              (_info("e/.wh..wh..opq", size=0), b""))
    got = pull(_image(tmp_path, low, up), tmp_path / "out", full=True)
    assert sorted(got.files) == ["-new", "d/b", "e/-y"]


def test_sha512_digests_are_verified_end_to_end(tmp_path):
    """The second registered algorithm: blobs/sha512/<hex> in a layout, hashed with sha512 while pulled."""
    import hashlib

    layer = _tar((_info("data/x", size=2), b"ok"))
    d512 = "sha512:" + hashlib.sha512(layer).hexdigest()
    ref = _layout(tmp_path / "l", _manifest([_desc("application/vnd.oci.image.layer.v1.tar", layer, d512)]), [])
    (tmp_path / "l" / "blobs" / "sha512").mkdir()
    (tmp_path / "l" / "blobs" / "sha512" / d512[7:]).write_bytes(layer)
    assert pull(ref, tmp_path / "out").files == ("x",)
    (tmp_path / "l" / "blobs" / "sha512" / d512[7:]).write_bytes(layer.replace(b"ok", b"no"))
    from kaito.image_builder import VerificationError

    with pytest.raises(VerificationError, match="sha512:"):
        pull(ref, tmp_path / "out2")
    _nothing_left(tmp_path / "out2")


_SEED_TAR = _tar(
    (_info("data/a" * 30, size=700), os.urandom(700)),  # long name: a PAX header
    (_info("data/l", tarfile.SYMTYPE, linkname="a"), b""),
    (_info("data/d", tarfile.DIRTYPE), b""),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(_SEED_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, len(_SEED_TAR)))
def test_mutated_tars_fail_with_oci_errors_only(tmp_path_factory, edits, cut):
    """Any byte edits or truncation of a PAX tar: extracted, or refused with OCIError; never another exception."""
    from kaito.image_builder.oci.extract import extract_tar

    data = bytearray(_SEED_TAR)
    for pos, val in edits:
        data[pos] = val
    root = tmp_path_factory.mktemp("mut")
    try:
        extract_tar([bytes(data[:cut])], root, "mutant")
    except OCIError:
        pass
