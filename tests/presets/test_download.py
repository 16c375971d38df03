"""The one resumable downloader against a scripted loopback server: retries, Range, 416, checks."""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kaito.presets.download import DownloadError, DownloadRefused, download
from kaito.presets.errors import InvalidInput
from kaito.presets.retry import Backoff

BODY = os.urandom(300_000)


class Script:
    """What the server answers: a queue of statuses before serving, and how it treats Range."""

    def __init__(self) -> None:
        self.statuses: list[tuple[int, dict]] = []
        self.ignore_range = False
        self.no_length = False
        self.body = BODY
        self.requests: list[str | None] = []


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            script.requests.append(rng)
            if script.statuses:
                status, headers = script.statuses.pop(0)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, start = script.body, 0
            if rng and not script.ignore_range:
                start = int(rng[6:].rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
            else:
                self.send_response(200)
            if not script.no_length:
                self.send_header("Content-Length", str(len(body) - start))
            else:
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body[start:])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/f.bin?sig=SECRET"
    yield script
    httpd.shutdown()
    httpd.server_close()


FAST = Backoff(attempts=4, base=0.001)


def test_retries_503_and_429_honouring_retry_after(server, tmp_path):
    server.statuses = [(503, {"Retry-After": "7"}), (429, {"Retry-After": "3"})]
    waits: list[float] = []
    p = download(server.url, tmp_path / "f.bin", policy=FAST, sleep=waits.append)
    assert p.read_bytes() == BODY
    assert waits == [7.0, 3.0] and len(server.requests) == 3


@pytest.mark.parametrize("status", [404, 401, 501])
def test_no_retry_on_final_statuses(server, tmp_path, status):
    server.statuses = [(status, {})] * 3
    waits: list[float] = []
    with pytest.raises(DownloadError) as e:
        download(server.url, tmp_path / "f.bin", policy=FAST, sleep=waits.append)
    assert e.value.status == status and waits == [] and len(server.requests) == 1
    assert isinstance(e.value, DownloadRefused) == (status < 500)  # a 4xx is the user's to fix
    assert "SECRET" not in str(e.value) and f"HTTP {status}" in str(e.value)
    assert not (tmp_path / "f.bin").exists()


def test_gives_up_after_the_policy_attempts(server, tmp_path):
    server.statuses = [(502, {})] * 10
    with pytest.raises(DownloadError, match=r"HTTP 502 \(gave up after 3 retries\)"):
        download(server.url, tmp_path / "f.bin", policy=FAST, sleep=lambda s: None)
    assert len(server.requests) == 4


def test_resumes_a_part_and_checks_size_and_sha256(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY[:1234])
    got = []
    p = download(
        server.url,
        tmp_path / "f.bin",
        expected_size=len(BODY),
        sha256=hashlib.sha256(BODY).hexdigest(),
        progress=lambda done, total: got.append((done, total)),
    )
    assert p.read_bytes() == BODY and server.requests == ["bytes=1234-"]
    assert got[0] == (1234, len(BODY)) and got[-1] == (len(BODY), len(BODY))
    assert not (tmp_path / "f.bin.part").exists()


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5000)  # not a prefix of BODY: must not survive
    p = download(server.url, tmp_path / "f.bin", sha256=hashlib.sha256(BODY).hexdigest())
    assert p.read_bytes() == BODY


def test_416_on_a_whole_part_means_done(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY)
    p = download(server.url, tmp_path / "f.bin", sha256=hashlib.sha256(BODY).hexdigest())
    assert p.read_bytes() == BODY and server.requests == [f"bytes={len(BODY)}-"]


def test_sha256_mismatch_discards(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch, the file was discarded"):
        download(server.url, tmp_path / "f.bin", sha256="0" * 64, what="model.bin of org/x@abc")
    assert not list(tmp_path.iterdir())


def test_size_limit_without_content_length(server, tmp_path):
    server.no_length = True  # the limit must hold while streaming, not only from the header
    with pytest.raises(InvalidInput, match=r"exceeds the size limit 1000 \(--max-bytes\)"):
        download(server.url, tmp_path / "f.bin", max_bytes=1000)
    assert not list(tmp_path.iterdir())


def test_more_bytes_than_expected_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match=f"sent {len(BODY)} bytes, 1000 expected"):
        download(server.url, tmp_path / "f.bin", expected_size=1000)
    assert not list(tmp_path.iterdir())


def test_a_body_cut_short_is_resumed_in_the_same_call(server, tmp_path):
    """Without a Content-Length a cut body looks like a clean end; the expected size catches it."""
    server.no_length = True
    server.body = BODY[: len(BODY) // 2]  # the first answer holds half ...

    def whole_again(done, total):
        server.body = BODY  # ... and later ones the whole file

    p = download(
        server.url, tmp_path / "f.bin", expected_size=len(BODY), policy=FAST, sleep=lambda s: None, progress=whole_again
    )
    assert p.read_bytes() == BODY
    assert server.requests == [None, f"bytes={len(BODY) // 2}-"]
