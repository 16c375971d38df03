"""A loopback stand-in for the Hugging Face hub's file API, as kaito.presets.hub uses it.

Used by tests that download a preset at its pinned revision: the recursive tree
listing (`/api/models/<repo>/tree/<rev>`, with LFS sha256 and sizes) and file
downloads (`/<repo>/resolve/<rev>/<file>`, with Range). Options: a required
token (401 without `Authorization: Bearer <token>`, like a gated repo) and
`stall`: file names whose first download sends half the body and then hangs,
so a test can kill the downloader mid-file and check the rerun resumes; `cut`:
the same but the connection drops at once; `lfs_claims`: what the listing
says an LFS file holds (a tampered download).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit


@dataclass
class HubState:
    repo: str
    revision: str
    files: dict[str, bytes]
    token: Optional[str] = None
    hits: list[str] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)
    unauthorized: int = 0
    refused: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    stall: set[str] = field(default_factory=set)
    cut: set[str] = field(default_factory=set)
    lfs_claims: dict[str, bytes] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def listing(self) -> list[dict]:
        out = []
        for name, body in sorted(self.files.items()):
            entry = {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
            if name.endswith(".safetensors"):
                claimed = self.lfs_claims.get(name, body)
                entry["lfs"] = {"oid": hashlib.sha256(claimed).hexdigest(), "size": len(body), "pointerSize": 134}
            out.append(entry)
        return out


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    tree = f"/api/models/{state.repo}/tree/{state.revision}"
    resolve = f"/{state.repo}/resolve/{state.revision}/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                state.unauthorized += 1
                state.refused.append(self.path)
                state.refused.append(self.path)
                self._send(401, b'{"error": "Access to model is restricted"}', "application/json")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = unquote(urlsplit(self.path).path)
            state.hits.append(path)
            name = path[len(resolve):] if path.startswith(resolve) else None
            if not path.startswith(tree) and name not in state.files:
                self._send(404)  # anything else huggingface_hub asks (e.g. its own API probes)
                return
            if not self._authorized():
                return
            if name is None:
                self._send(200, json.dumps(state.listing()).encode(), "application/json")
                return
            self._file(name, state.files[name])

        def _file(self, name: str, body: bytes) -> None:
            rng = self.headers.get("Range")
            if rng:
                state.ranges.append((name, rng))
                start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in state.stall | state.cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if name in state.stall:
                    state.release.wait(60)  # the test kills the client meanwhile
                state.stall.discard(name)
                state.cut.discard(name)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve_hub(state: HubState) -> Iterator[str]:
    """Serve `state` on a free loopback port; yields the endpoint URL (HF_ENDPOINT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
