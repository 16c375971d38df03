"""A push killed mid-blob resumes on rerun from the registry's offset, sending only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kaito.image_builder import Layer, append, empty_image, pull, push
from kaito.image_builder.oci import values as V

KAITO = [sys.executable, "-m", "kaito.presets.cli"]


def _kaito(*args: str, env: dict) -> subprocess.Popen:
    code = "import sys; from kaito.presets.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _state_offset(cache: Path) -> int:
    for p in (cache / "uploads").glob("*.json"):
        try:
            return json.loads(p.read_text())["offset"]
        except (ValueError, KeyError, OSError):
            pass
    return 0


def test_killed_push_resumes_from_registry_offset(registry, tmp_path, isolated_cache):
    size = 24 << 20
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(size))
    layer = Layer.from_file(
        f, "workspace/weights/model.safetensors", annotations={V.MODEL_FILEPATH: "model.safetensors"}
    )
    img = append(empty_image(), [layer], annotations={V.ANN_CONTENT_ROOT: "workspace/weights"})
    push(img, f"oci:{tmp_path / 'layout'}:v1")
    env = {**os.environ, "KAITO_CACHE_DIR": str(isolated_cache)}
    src, dst = f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/resume/model:v1"

    # 1 MiB chunks at 2 MiB/s: the client spends almost all its time sleeping between PATCHes,
    # and it records the offset just before sleeping, so the kill lands between chunks.
    proc = _kaito("image", "copy", src, dst, "--quiet", "--chunk-size", "1M", "--limit-rate", "2M", env=env)
    deadline = time.monotonic() + 60
    while _state_offset(isolated_cache) < (2 << 20):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "push made no progress"
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _state_offset(isolated_cache)
    assert 0 < at_kill < layer.size
    assert httpx.get(f"{registry.url}/v2/resume/model/manifests/v1").status_code == 404  # nothing reported pushed

    rerun = _kaito("image", "copy", src, dst, "--json", env=env)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    res = json.loads(out)
    assert res["digest"] == img.digest
    assert layer.digest in res["resumed"]
    config = 0 if img.config_blob.digest in res["skipped"] else len(img.config_bytes)
    assert res["bytes_uploaded"] == layer.size - at_kill + config  # only the missing bytes went up
    got = pull(dst, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == f.read_bytes()
    assert got.digest == img.digest


def test_upload_cut_inside_a_chunk_restarts_that_blob(registry, tmp_path, isolated_cache):
    """Distribution drops a session whose PATCH was cut (its offset no longer matches the upload state);
    the rerun sees that, starts that blob afresh and completes."""
    from kaito.image_builder.oci.layer import Layer as L
    from kaito.image_builder.oci.push import Pusher
    from kaito.image_builder.oci.remote import Registry

    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(6 << 20))
    layer = L.from_file(f, "workspace/weights/w.safetensors")
    reg = Registry(registry.host)

    class Cut(Exception):
        pass

    class CutSource:
        """A source that fails in the middle of the second chunk, like a process dying mid-request."""

        mount_from = None

        def open_blob(self, digest, size, offset=0):
            sent = offset
            for b in layer.open(offset):
                if sent >= (3 << 20):
                    raise Cut()
                sent += len(b)
                yield b

    import dataclasses

    cut_layer = dataclasses.replace(layer, segments=None, source=CutSource())
    try:
        with pytest.raises(Cut):
            Pusher(reg, "resume/cut", chunk_size=2 << 20).push_blob(cut_layer)
        assert _state_offset(isolated_cache) == 2 << 20  # one whole chunk was accepted
        p = Pusher(reg, "resume/cut", chunk_size=2 << 20)
        assert p.push_blob(layer) == "uploaded"  # the stale session was refused, so: from the start
        assert p.stats.bytes_uploaded == layer.size
        assert reg.head_blob("resume/cut", layer.digest) == layer.size
        assert not list((isolated_cache / "uploads").glob("*.json"))  # state cleaned up
    finally:
        reg.close()


def _upload_sizes(registry, repo: str) -> list[int]:
    """Bytes the registry holds in each open upload session of `repo` (distribution's storage layout)."""
    d = registry.root / "data" / "docker" / "registry" / "v2" / "repositories" / repo / "_uploads"
    return [p.stat().st_size for p in d.glob("*/data")] if d.is_dir() else []


def test_push_killed_mid_chunk_resends_only_that_blob(registry, tmp_path, isolated_cache):
    """SIGKILL while a PATCH body is in flight (the registry is paused so the kill lands inside chunk 2).

    Distribution keeps the cut PATCH's bytes but refuses the session on resume (the state token's
    offset no longer matches what it stored; registry/handlers/blobupload.go), so the rerun
    restarts that one blob from its first byte; finished blobs are never resent.
    """
    chunk = 8 << 20
    done_f, cut_f = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    done_f.write_bytes(os.urandom(3 << 20))
    cut_f.write_bytes(os.urandom(3 * chunk))
    a = Layer.from_file(done_f, "workspace/weights/a.safetensors")
    b = Layer.from_file(cut_f, "workspace/weights/b.safetensors")
    img = append(empty_image(), [a, b], annotations={V.ANN_CONTENT_ROOT: "workspace/weights"})
    push(img, f"oci:{tmp_path / 'layout'}:v1")
    env = {**os.environ, "KAITO_CACHE_DIR": str(isolated_cache)}
    src, dst = f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/resume/midchunk:v1"
    # One blob at a time; at 8 MiB/s the client sleeps ~1 s after each accepted chunk.
    proc = _kaito("image", "copy", src, dst, "--quiet", "-j", "1", "--chunk-size", "8M", "--limit-rate", "8M", env=env)
    deadline = time.monotonic() + 60
    while _state_offset(isolated_cache) < chunk:  # chunk 1 of b accepted; the client now sleeps
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "push made no progress"
        time.sleep(0.005)
    os.kill(registry.proc.pid, signal.SIGSTOP)  # the client's next PATCH stalls once socket buffers fill
    try:
        time.sleep(2.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        os.kill(registry.proc.pid, signal.SIGCONT)
    time.sleep(0.5)  # the registry reads what the kernel buffered, then sees the body end early
    held = max(_upload_sizes(registry, "resume/midchunk"))
    assert chunk < held < 2 * chunk, held  # the kill landed inside chunk 2
    assert httpx.get(f"{registry.url}/v2/resume/midchunk/manifests/v1").status_code == 404

    rerun = _kaito("image", "copy", src, dst, "--json", env=env)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    res = json.loads(out)
    assert a.digest in res["skipped"]  # a finished blob is never resent
    assert b.digest not in res["resumed"]  # distribution refused the cut session: b went up afresh
    config = 0 if img.config_blob.digest in res["skipped"] else len(img.config_bytes)
    assert res["bytes_uploaded"] == b.size + config
    got = pull(dst, tmp_path / "out")
    assert got.digest == img.digest and (tmp_path / "out" / "b.safetensors").read_bytes() == cut_f.read_bytes()
