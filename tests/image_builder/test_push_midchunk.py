"""What Debian's docker-registry (distribution 2.8) does with an upload whose PATCH was cut, and how we cope.

Facts pinned here (registry/handlers/blobupload.go, `ResumeBlobUpload`): every
request on an upload URL carries the HMAC-signed `_state` holding the offset
the registry handed out after the last accepted PATCH. A cut PATCH leaves more
bytes stored than that offset ("upload resumed at wrong offset" in its log), so
every later request on the session, of any method (status GET, PATCH, PUT,
DELETE), is answered 404 BLOB_UPLOAD_INVALID without a Range header. A request
without `_state` is refused the same way, and a fresh `_state` is only minted
by a request that passes the check, so no client can learn the stored size or
resume: the blob restarts, and the orphaned bytes stay on the registry's disk
until its upload purger removes them. A kill *between* chunks resumes
(tests/image_builder/test_resume.py).
"""

from __future__ import annotations

import os
import socket
import time

import httpx

from kaito.image_builder import Layer
from kaito.image_builder.oci.push import Pusher
from kaito.image_builder.oci.remote import Registry

CHUNK = 1 << 20


def _cut_patch(location: str, start: int, length: int, send: int) -> None:
    """A PATCH that promises `length` bytes, sends `send`, and closes: a process killed mid-chunk."""
    url = httpx.URL(location)
    head = (
        f"PATCH {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
        f"Content-Range: {start}-{start + length - 1}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port)) as s:
        s.sendall(head + os.urandom(send))


def _upload_sizes(registry, repo: str) -> list[int]:
    d = registry.root / "data" / "docker" / "registry" / "v2" / "repositories" / repo / "_uploads"
    return [p.stat().st_size for p in d.glob("*/data")] if d.is_dir() else []


def test_a_cut_patch_cancels_the_session_and_the_rerun_restarts_that_blob(registry, tmp_path, isolated_cache):
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(3 * CHUNK))
    layer = Layer.from_file(f, "workspace/weights/w.safetensors")
    reg = Registry(registry.host)
    repo = "pin/cut"
    try:
        location = reg.start_upload(repo)
        first = layer.read_bytes()[:CHUNK]
        location = reg.patch(repo, location, 0, CHUNK, lambda: [first])  # chunk 1 accepted
        assert reg.upload_offset(repo, location)[1] == CHUNK  # between chunks the session resumes
        _cut_patch(location, CHUNK, CHUNK, CHUNK // 3)
        deadline = time.monotonic() + 10
        while max(_upload_sizes(registry, repo), default=0) <= CHUNK:  # the registry kept the cut bytes
            assert time.monotonic() < deadline, _upload_sizes(registry, repo)
            time.sleep(0.02)

        # Every request on that session is refused from now on, whatever its method, with or
        # without the signed state, and none says how many bytes the registry holds.
        for method, url in [("GET", location), ("GET", location), ("GET", location.split("?")[0])]:
            r = httpx.request(method, url)
            assert r.status_code == 404 and "BLOB_UPLOAD_INVALID" in r.text and "range" not in r.headers, r
        r = httpx.request("PATCH", location, content=b"x" * 10, headers={"Content-Range": f"{CHUNK}-{CHUNK + 9}"})
        assert r.status_code == 404 and "BLOB_UPLOAD_INVALID" in r.text
        assert reg.upload_offset(repo, location) is None

        # Our rerun, holding the saved session, sees it gone and sends the blob afresh without an error.
        p = Pusher(reg, repo, chunk_size=CHUNK)
        p._save(layer.digest, location, CHUNK)
        assert p.push_blob(layer) == "uploaded"
        assert p.stats.bytes_uploaded == layer.size and p.stats.resumed == []
        assert reg.head_blob(repo, layer.digest) == layer.size
        assert not list((isolated_cache / "uploads").glob("*.json"))
    finally:
        reg.close()
