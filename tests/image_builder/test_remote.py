"""The layered registry client against a scripted loopback server: retry policy, auth, lazy scheme, no I/O at construction.

The scripted server is a test peer at our HTTP boundary (statuses the real
registry cannot be made to answer on demand); the real docker-registry covers
the API itself in test_push/test_pull.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import AuthError, RegistryError
from kaito.image_builder.oci.remote import Registry
from kaito.image_builder.oci.transport import parse_challenge

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": V.OCI_MANIFEST, "layers": []}).encode()


class Script:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict]] = []  # answered first, in order; then the manifest
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)


@pytest.fixture
def scripted():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            script.requests.append((self.command, self.path, self.headers.get("Authorization")))
            if script.answers:
                status, headers = script.answers.pop(0)
                body = json.dumps({"errors": [{"code": "SCRIPTED", "message": f"status {status}"}]}).encode()
            else:
                status, headers, body = 200, {"Content-Type": V.OCI_MANIFEST}, MANIFEST
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    script.host = f"127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


def _registry(host: str, waits: list, **kw) -> Registry:
    return Registry(host, retries=3, backoff=0.001, sleep=waits.append, **kw)


def test_retries_503_and_429_waiting_what_retry_after_says(scripted):
    scripted.answers = [(503, {"Retry-After": "7"}), (429, {"Retry-After": "2"}), (502, {})]
    waits: list[float] = []
    reg = _registry(scripted.host, waits)
    try:
        raw, mt = reg.get_manifest("r/x", "v1")
    finally:
        reg.close()
    assert raw == MANIFEST and mt == V.OCI_MANIFEST
    assert waits[:2] == [7.0, 2.0] and len(waits) == 3 and waits[2] < 1  # the 502 had no hint: backoff
    assert len(scripted.requests) == 4


def test_gives_up_after_the_policy_with_the_registry_diagnostics(scripted):
    scripted.answers = [(503, {})] * 10
    waits: list[float] = []
    with pytest.raises(RegistryError) as e:
        _registry(scripted.host, waits).get_manifest("r/x", "v1")
    assert e.value.status == 503 and len(scripted.requests) == 4 and len(waits) == 3
    assert "reading manifest" in str(e.value) and "SCRIPTED: status 503" in str(e.value)


@pytest.mark.parametrize(
    "status, headers, kind",
    [
        (404, {}, RegistryError),
        (501, {}, RegistryError),
        (401, {}, AuthError),  # no challenge: nothing to answer
        (401, {"WWW-Authenticate": 'Basic realm="r"'}, AuthError),  # a challenge, but no credentials
    ],
)
def test_no_retry_on_final_statuses(scripted, status, headers, kind):
    scripted.answers = [(status, headers)] * 5
    waits: list[float] = []
    with pytest.raises(kind) as e:
        _registry(scripted.host, waits).get_manifest("r/x", "v1")
    assert e.value.status == status and waits == [] and len(scripted.requests) == 1
    assert f"http://{scripted.host}/v2/r/x/manifests/v1" in str(e.value)


def test_basic_challenge_is_answered_once_and_remembered_per_scope(scripted, tmp_path):
    scripted.answers = [(401, {"WWW-Authenticate": 'Basic realm="r"'})]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {scripted.host: {"auth": base64.b64encode(b"u:pw").decode()}}}))
    reg = _registry(scripted.host, [], auth_file=cfg)
    try:
        reg.get_manifest("r/x", "v1")
        reg.get_manifest("r/x", "v2")
    finally:
        reg.close()
    sent = [a for _, _, a in scripted.requests]
    basic = "Basic " + base64.b64encode(b"u:pw").decode()
    assert sent == [None, basic, basic]  # challenged once, then the header goes with the first try


def test_connection_refused_is_retried_then_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens
    waits: list[float] = []
    with pytest.raises(RegistryError) as e:
        _registry(f"127.0.0.1:{port}", waits).get_manifest("r/x", "v1")
    assert e.value.status is None and len(waits) == 3
    assert f"GET http://127.0.0.1:{port}/v2/r/x/manifests/v1: no response: ConnectError" in str(e.value)


def test_construction_does_no_io_and_the_scheme_probe_runs_once(scripted):
    reg = Registry(scripted.host, insecure=True, retries=0)
    try:
        assert scripted.requests == [] and reg._scheme._scheme is None  # nothing sent, nothing probed
        reg.get_manifest("r/x", "v1")  # the https probe fails against a plain-http server: http it is
        assert reg.scheme == "http"
        reg.get_manifest("r/x", "v2")
        assert [p for _, p, _ in scripted.requests] == ["/v2/r/x/manifests/v1", "/v2/r/x/manifests/v2"]
    finally:
        reg.close()


@pytest.mark.parametrize(
    "status, why", [(201, "201 Created to a request that sent no blob"), (202, "no Location header")]
)
def test_an_upload_session_without_a_location_is_a_named_registry_error(scripted, status, why):
    scripted.answers = [(status, {})]
    reg = _registry(scripted.host, [])
    try:
        with pytest.raises(RegistryError, match=why) as e:
            reg.start_upload("r/x")
    finally:
        reg.close()
    assert e.value.status == status and "starting an upload to" in str(e.value)
    assert scripted.requests[0][:2] == ("POST", "/v2/r/x/blobs/uploads/")


def test_parse_challenge():
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"') == (
        "bearer",
        {"realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"},
    )
    assert parse_challenge("") == ("", {})
