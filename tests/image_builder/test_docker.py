"""Dockerfiles/ with a real docker daemon that this test starts itself (never the host's socket or network).

The daemon runs with DEVELOPERS.md's flags (own data/exec roots and socket, no
bridge, no iptables), so only images that need no hub are built here: the
adapter image FROM scratch. Its push goes to the loopback test registry and
our pull must read the Docker schema2 manifest docker writes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from kaito.image_builder import inspect, pull

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def dockerd():
    exe = shutil.which("dockerd")
    if not exe:
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    d = Path(tempfile.mkdtemp(prefix="kd", dir="/tmp"))  # short: unix socket paths are limited to 108 bytes
    sock = d / "docker.sock"
    log = open(d / "dockerd.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            "--data-root",
            str(d / "data"),
            "--exec-root",
            str(d / "exec"),
            "-H",
            f"unix://{sock}",
            "--pidfile",
            str(d / "pid"),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    import docker

    deadline = time.monotonic() + 40
    while True:
        if proc.poll() is not None:
            pytest.skip(f"dockerd could not start here: {(d / 'dockerd.log').read_text()[-400:]}")
        try:
            c = docker.DockerClient(base_url=f"unix://{sock}")
            c.ping()
            c.close()
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.skip("dockerd did not answer within 40 s")
            time.sleep(0.2)
    yield f"unix://{sock}"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(d, ignore_errors=True)


def test_adapter_dockerfile_builds_from_scratch_and_pulls(dockerd, registry, adapter_dir, tmp_path):
    from kaito.image_builder.docker_build import build_dockerfile

    ref = f"{registry.host}/adapters/docker-built:v1"
    res = build_dockerfile(
        "adapter", ref, context=adapter_dir, docker_host=dockerd, buildargs={"PRESET": "tiny-phi-3"}, push=True
    )
    assert res["digest"] and res["digest"].startswith("sha256:")
    info = inspect(ref)
    assert info["digest"] == res["digest"]
    assert info["labels"]["sh.kaito.model.name"] == "tiny-phi-3"
    got = pull(ref, tmp_path / "pulled")
    assert sorted(got.files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == (
        adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


def test_build_base_reports_missing_daemon_clearly(capsys, tmp_path):
    from kaito.presets.cli import main

    rc = main(["image", "build-base", "127.0.0.1:1/kaito-base:x", "--docker-host", f"unix://{tmp_path}/none.sock"])
    assert rc == 1 and "no docker daemon reachable" in capsys.readouterr().err


def test_docker_daemon_is_an_image_source(dockerd, registry, adapter_dir, tmp_path, monkeypatch):
    from kaito.image_builder import Connection, copy
    from kaito.image_builder.docker_build import build_dockerfile

    build_dockerfile("adapter", "kaito-test/adapter:local", context=adapter_dir, docker_host=dockerd, push=False)
    monkeypatch.setenv("DOCKER_HOST", dockerd)
    with Connection() as conn:
        res = copy("docker-daemon:kaito-test/adapter:local", f"{registry.host}/adapters/from-daemon:v1", conn)
    assert res.digest.startswith("sha256:")
    got = pull(f"{registry.host}/adapters/from-daemon:v1", tmp_path / "pulled")
    assert sorted(got.files) == ["adapter_config.json", "adapter_model.safetensors"]


def test_build_base_command_builds_and_pushes(dockerd, registry, adapter_dir, capsys):
    from kaito.presets.cli import main

    ref = f"{registry.host}/adapters/by-cli:v1"
    rc = main(
        ["image", "build-base", ref, "--dockerfile", "adapter", "--context", str(adapter_dir), "--docker-host", dockerd]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "pushed sha256:" in out.out
    assert inspect(ref)["layers"]


@pytest.mark.parametrize("name", ["base", "tuning", "operator"])
def test_hub_based_dockerfiles_parse_and_stop_only_at_the_missing_base(dockerd, name):
    """Without a hub these cannot build here; the daemon must still parse them and fail only on the base image."""
    from kaito.image_builder.docker_build import build_dockerfile
    from kaito.presets.errors import KaitoError

    with pytest.raises(KaitoError) as e:
        build_dockerfile(name, f"kaito-test/{name}:parse", docker_host=dockerd, push=False)
    msg = str(e.value).lower()
    assert "unknown instruction" not in msg and "parse error" not in msg and "syntax" not in msg
    assert any(w in msg for w in ("python", "kaito-base", "pull", "lookup", "dial", "not found", "denied")), msg
