"""Fixtures of the tuning tests: dolly-style parquet data and a local HTTP file server with Range support."""

from __future__ import annotations

import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

# Our helpers module sits beside this file; importlib mode does not add it to sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from tuning_datagen import dolly_rows, write_parquet  # noqa: E402


class FileServer:
    """Serves a directory on 127.0.0.1 with Range support and injectable failures."""

    def __init__(self, root: Path):
        self.root = root
        self.fail_next = 0  # answer the next N requests with 503
        self.cut_after: int | None = None  # drop the connection after this many body bytes (once)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                path = self.path.split("?")[0].lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if server.fail_next > 0:
                    server.fail_next -= 1
                    self.send_error(503)
                    return
                f = server.root / path
                if not f.is_file():
                    self.send_error(404)
                    return
                body = f.read_bytes()
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if server.cut_after is not None:
                    n, server.cut_after = server.cut_after, None
                    self.wfile.write(chunk[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server(tmp_path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dolly_parquet(tmp_path_factory) -> Path:
    """A dolly-15k-oai-style parquet (messages column: system/user/assistant), 32 rows."""
    return write_parquet(tmp_path_factory.mktemp("dolly") / "train-00000-of-00001.parquet", dolly_rows(32))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    dest = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, dest)
    return dest
