"""Real OCI registries for tests: Debian's docker-registry (distribution 2.8).

Used by image builder, tuning and end-to-end tests through the `registry`
(anonymous) and `auth_registry` (htpasswd basic auth) fixtures. Each server
gets its own config, storage directory and free loopback port.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RegistryServer:
    host: str  # "127.0.0.1:PORT"
    root: Path
    proc: subprocess.Popen
    username: Optional[str] = None
    password: Optional[str] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def dockerconfig(self, path: Path, password: Optional[str] = None) -> Path:
        """Write a dockerconfigjson (the mounted imagePushSecret form) for this registry."""
        auths = {}
        if self.username:
            pw = password if password is not None else self.password
            token = base64.b64encode(f"{self.username}:{pw}".encode()).decode()
            auths[self.host] = {"auth": token}
        path.write_text(json.dumps({"auths": auths}))
        return path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_registry(root: Path, username: Optional[str] = None, password: Optional[str] = None) -> RegistryServer:
    if not Path(REGISTRY_BIN).exists():
        pytest.fail("docker-registry is not installed: .ci/run installs Debian's docker-registry package")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if username:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (root / "htpasswd").write_text(f"{username}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: kaito-test\n    path: {root / 'htpasswd'}\n"
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    server = RegistryServer(f"127.0.0.1:{port}", root, proc, username, password)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()[-2000:]}")
        try:
            httpx.get(f"{server.url}/v2/", timeout=1)
            return server
        except httpx.HTTPError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("docker-registry did not answer within 20 s")


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Iterator[RegistryServer]:
    """An anonymous registry on a free loopback port, shared by the session."""
    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory) -> Iterator[RegistryServer]:
    """A registry behind htpasswd basic auth (user `kaito`)."""
    server = start_registry(tmp_path_factory.mktemp("auth-registry"), "kaito", "s3cret-pa55word")
    yield server
    server.stop()
