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


# --- bearer-token registry (distribution's `auth: token`) with a small token server of our own ----------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker-token-spec server: basic auth in, RS256 JWT out (signed with openssl; x5c names the cert).

    A test peer for registries configured with `auth: token:`; records each request's scopes.
    """

    def __init__(self, root: Path, username: str, password: str, service: str = "kaito-test-registry") -> None:
        import http.server
        import threading
        import urllib.parse

        self.root, self.username, self.password, self.service = root, username, password, service
        self.issuer = "kaito-test-token-issuer"
        self.key, self.cert = root / "token.key", root / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out",
             str(self.cert), "-days", "2", "-subj", "/CN=kaito-test-token"],
            check=True, capture_output=True,
        )
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok_user = None
                if auth.startswith("Basic "):
                    user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if user == server.username and pw == server.password:
                        ok_user = user
                    else:
                        self.send_response(401)
                        self.end_headers()
                        return
                scopes = q.get("scope", [])
                server.requests.append({"user": ok_user, "scopes": scopes})
                access = []
                for s in scopes:
                    typ, name, actions = s.split(":", 2)
                    acts = actions.split(",") if ok_user else [a for a in actions.split(",") if a == "pull"]
                    access.append({"type": typ, "name": name, "actions": acts})
                body = json.dumps({"token": server.sign(ok_user or "", access), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sign(self, subject: str, access: list) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_token_registry(root: Path, username: str, password: str) -> tuple[RegistryServer, TokenServer]:
    """A registry that answers 401 with a Bearer challenge pointing at our token server."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = TokenServer(root, username, password)
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"auth:\n  token:\n    realm: {tokens.url}\n    service: {tokens.service}\n    issuer: {tokens.issuer}\n"
        f"    rootcertbundle: {tokens.cert}\n"
    )
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    server = RegistryServer(f"127.0.0.1:{port}", root, proc, username, password)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tokens.stop()
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()[-2000:]}")
        try:
            httpx.get(f"{server.url}/v2/", timeout=1)
            return server, tokens
        except httpx.HTTPError:
            time.sleep(0.05)
    server.stop()
    tokens.stop()
    raise RuntimeError("docker-registry did not answer within 20 s")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """A registry behind bearer-token auth (user `kaito`); yields (RegistryServer, TokenServer)."""
    server, tokens = start_token_registry(tmp_path_factory.mktemp("token-registry"), "kaito", "t0ken-s3cret-pw")
    yield server, tokens
    server.stop()
    tokens.stop()
