"""Fast checks of the cluster harness's own parts (no docker): the port forwarder and `$(VAR)` expansion.

The forwarder pair below is the one each pod gets (tests/cluster/kubelet.py), here both on the
host: TCP -> unix socket -> TCP, and it must carry a request and its answer unchanged.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from kubelet import FORWARD, expand, free_port


def _forwarder(*pairs: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(FORWARD), *pairs], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_forwarder_pair_carries_http_through_a_unix_socket(tmp_path: Path) -> None:
    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 5))
            self.end_headers()
            self.wfile.write(b"echo:" + body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sock, front = tmp_path / "p.sock", free_port()
    inner = _forwarder(f"unix:{sock}=tcp:127.0.0.1:{server.server_address[1]}")
    outer = _forwarder(f"tcp:127.0.0.1:{front}=unix:{sock}")
    try:
        payload = bytes(range(256)) * 1024  # 256 KiB: several reads and writes each way
        r = httpx.post(f"http://127.0.0.1:{front}/", content=payload, timeout=10)
        assert r.status_code == 200 and r.content == b"echo:" + payload
    finally:
        for proc in (outer, inner):
            proc.terminate()
            proc.wait(5)
        server.shutdown()


def test_a_closed_target_looks_like_a_closed_port(tmp_path: Path) -> None:
    front = free_port()
    proc = _forwarder(f"tcp:127.0.0.1:{front}=unix:{tmp_path / 'nobody.sock'}")
    try:
        try:
            httpx.get(f"http://127.0.0.1:{front}/health", timeout=5)
            raise AssertionError("a request through a forwarder to nothing answered")
        except httpx.TransportError:
            pass  # the readiness probe sees "not ready", as for a port nothing listens on
    finally:
        proc.terminate()
        proc.wait(5)


def test_dollar_paren_expansion_is_kubernetes():
    env = {"POD_INDEX": "1", "A": "x"}
    assert expand("$(POD_INDEX)", env) == "1"
    assert expand("--rank=$(POD_INDEX)-$(A)", env) == "--rank=1-x"
    assert expand("$(UNKNOWN)", env) == "$(UNKNOWN)"  # unresolved references stay as written
