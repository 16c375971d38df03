"""Fixtures for the image builder tests: isolated caches, adapter and weight dirs, a fault-injecting proxy.

The proxy is a test peer in front of the real registry (our boundary): it
forwards every request and answers chosen ones with an error first, so
retries and resumes are exercised against the real registry behind it.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "kaito-cache"
    monkeypatch.setenv("KAITO_CACHE_DIR", str(d))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    return d


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny-phi-3", "peft_type": "LORA", "r": 4}')
    (d / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    return d


@pytest.fixture
def weights_dir(tiny_model_dir, tmp_path) -> Path:
    d = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, d)
    return d


class FaultProxy:
    """Forwards HTTP to `upstream`; `fail(method, path_part, status, times)` makes matching requests fail first,
    `cut(method, path_part, times)` sends their answer's headers and half its body, then hangs up."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[list] = []
        self.log: list[tuple[str, str, int]] = []
        self.client = httpx.Client(timeout=60)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                cut = False
                for rule in proxy.rules:
                    method, part, status, left = rule
                    if left > 0 and self.command == method and part in self.path:
                        rule[3] -= 1
                        proxy.log.append((self.command, self.path, status))
                        if status == "cut":
                            cut = True
                            break
                        self.send_response(status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")
                }
                r = proxy.client.request(
                    self.command, f"http://{proxy.upstream}{self.path}", headers=headers, content=body
                )
                proxy.log.append((self.command, self.path, r.status_code))
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        continue
                    if k.lower() == "location":
                        v = v.replace(proxy.upstream, proxy.host)
                    self.send_header(k, v)
                data = r.content if self.command != "HEAD" else b""
                self.send_header(
                    "Content-Length",
                    r.headers.get("content-length", str(len(data))) if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def fail(self, method: str, path_part: str, status: int, times: int = 1) -> None:
        self.rules.append([method, path_part, status, times])

    def cut(self, method: str, path_part: str, times: int = 1) -> None:
        self.rules.append([method, path_part, "cut", times])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


@pytest.fixture
def fault_proxy(registry):
    p = FaultProxy(registry.host)
    yield p
    p.stop()
