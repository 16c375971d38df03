"""The operator's API client against a loopback aiohttp server: timeouts, retries, Retry-After, temp files.

The server answers each path from a script (a list of steps, one per request), so
each test sees exactly how many tries the client made and what it did between them.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kaito.operator import schema
from kaito.operator.kube import KINDS, APIError, KubeAPI
from kaito.operator.settings import OperatorSettings
from kaito.presets.retry import Backoff

CM = "/api/v1/namespaces/ns/configmaps"
FAST = Backoff(attempts=4, base=0.01, cap=5.0)


class Script:
    """Per path, the answers to give in turn: (status, headers) or "drop" or ("sleep", seconds)."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, str], list[Any]] = {}
        self.seen: list[tuple[str, str, float]] = []

    def on(self, method: str, path: str, *steps: Any) -> None:
        self.steps[(method, path)] = list(steps)

    def tries(self, method: str, path: str) -> list[float]:
        return [t for m, p, t in self.seen if (m, p) == (method, path)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path)
        self.seen.append((*key, time.monotonic()))
        steps = self.steps.get(key) or [(404, {})]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step == "drop":  # close the connection without an answer
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.05)
            return web.Response()
        if step[0] == "sleep":
            await asyncio.sleep(step[1])
            return web.json_response({})
        status, headers = step
        body = {"kind": "ConfigMap", "metadata": {"name": "a"}} if status < 400 else {"message": f"said {status}"}
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield script, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_503_then_200_is_retried(server: tuple[Script, str]) -> None:
    script, url = server
    script.on("GET", f"{CM}/a", (503, {}), (200, {}))
    api = KubeAPI(url, policy=FAST)
    try:
        assert (await api.get("ConfigMap", "ns", "a"))["metadata"]["name"] == "a"
    finally:
        await api.close()
    assert len(script.tries("GET", f"{CM}/a")) == 2


async def test_429_waits_as_long_as_retry_after_says(server: tuple[Script, str]) -> None:
    script, url = server
    script.on("GET", f"{CM}/a", (429, {"Retry-After": "1"}), (200, {}))
    api = KubeAPI(url, policy=FAST)  # FAST alone would wait ~10 ms
    try:
        await api.get("ConfigMap", "ns", "a")
    finally:
        await api.close()
    first, second = script.tries("GET", f"{CM}/a")
    assert second - first >= 0.9


async def test_a_dropped_connection_is_retried_for_reads_not_for_creates(server: tuple[Script, str]) -> None:
    script, url = server
    script.on("GET", f"{CM}/a", "drop", (200, {}))
    script.on("POST", CM, "drop", (201, {}))
    api = KubeAPI(url, policy=FAST)
    try:
        assert await api.get("ConfigMap", "ns", "a") is not None
        with pytest.raises(APIError) as info:
            await api.create({"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}})
    finally:
        await api.close()
    assert len(script.tries("GET", f"{CM}/a")) == 2
    # The server may have created it before the drop: sending the POST again could create twice.
    assert len(script.tries("POST", CM)) == 1
    assert info.value.status == 0 and str(info.value).startswith(f"POST {CM}: connection failed")


async def test_creates_are_retried_only_when_the_server_did_not_act(server: tuple[Script, str]) -> None:
    script, url = server
    obj = {"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}}
    script.on("POST", CM, (429, {}), (503, {}), (201, {}))
    api = KubeAPI(url, policy=FAST)
    try:
        await api.create(obj)
        assert len(script.tries("POST", CM)) == 3 and api.writes == 1  # one write, whatever the tries
        script.on("POST", CM, (500, {}), (201, {}))
        with pytest.raises(APIError) as info:
            await api.create(obj)
    finally:
        await api.close()
    assert len(script.tries("POST", CM)) == 4
    assert info.value.status == 500 and "said 500" in str(info.value)


async def test_tries_run_out_with_the_last_error_and_4xx_is_not_retried(server: tuple[Script, str]) -> None:
    script, url = server
    script.on("GET", f"{CM}/a", (502, {}))
    script.on("PATCH", f"{CM}/b", (422, {}))
    api = KubeAPI(url, policy=FAST)
    try:
        with pytest.raises(APIError) as info:
            await api.get("ConfigMap", "ns", "a")
        assert info.value.status == 502 and str(info.value) == f"GET {CM}/a: HTTP 502: said 502"
        with pytest.raises(APIError):
            await api.patch("ConfigMap", "ns", "b", {"data": {}})
    finally:
        await api.close()
    assert len(script.tries("GET", f"{CM}/a")) == FAST.attempts
    assert len(script.tries("PATCH", f"{CM}/b")) == 1


async def test_a_slow_server_times_out_and_is_retried(server: tuple[Script, str]) -> None:
    script, url = server
    script.on("GET", f"{CM}/a", ("sleep", 2.0), (200, {}))
    api = KubeAPI(url, policy=FAST, timeout=aiohttp.ClientTimeout(total=0.3, connect=0.3))
    start = time.monotonic()
    try:
        assert await api.get("ConfigMap", "ns", "a") is not None
    finally:
        await api.close()
    assert time.monotonic() - start < 1.5 and len(script.tries("GET", f"{CM}/a")) == 2


async def test_a_server_that_is_not_there_is_one_error_naming_the_call() -> None:
    api = KubeAPI("http://127.0.0.1:9", policy=Backoff(attempts=2, base=0.01))
    try:
        with pytest.raises(APIError) as info:
            await api.list("Node")
    finally:
        await api.close()
    assert info.value.status == 0 and str(info.value).startswith("GET /api/v1/nodes: connection failed")


def test_settings_drive_the_timeouts_and_tries() -> None:
    info = _info("http://127.0.0.1:1")
    settings = OperatorSettings(api_connect_timeout_seconds=2.0, api_timeout_seconds=7.0, api_attempts=3)
    api = KubeAPI.from_connection_info(info, settings)
    assert (api._timeout.connect, api._timeout.total, api._policy.attempts) == (2.0, 7.0, 3)


def test_workspace_kind_follows_the_schemas_storage_version() -> None:
    assert KINDS["Workspace"].api_version == f"{schema.GROUP}/{schema.STORAGE_VERSION}"
    assert KINDS["Workspace"].base() == f"/apis/{schema.GROUP}/{schema.STORAGE_VERSION}"


def _info(server: str, **kw: Any) -> SimpleNamespace:
    fields = dict(
        token=None,
        scheme=None,
        username=None,
        password=None,
        insecure=False,
        ca_path=None,
        ca_data=None,
        certificate_path=None,
        private_key_path=None,
        certificate_data=None,
        private_key_data=None,
    )
    return SimpleNamespace(server=server, **{**fields, **kw})


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=kaito-test",
        ],
        check=True,
        capture_output=True,
    )
    return crt.read_bytes(), key.read_bytes()


async def test_client_key_files_are_private_and_gone_after_close(tmp_path: Path) -> None:
    crt, key = _self_signed(tmp_path)
    info = _info("https://127.0.0.1:6443", certificate_data=crt, private_key_data=key, ca_data=crt)
    api = KubeAPI.from_connection_info(info)
    cert_dir = api.cert_dir
    assert cert_dir is not None and stat.S_IMODE(os.stat(cert_dir).st_mode) == 0o700
    files = sorted(os.listdir(cert_dir))
    assert files == ["client.crt", "client.key"]
    assert all(stat.S_IMODE(os.stat(os.path.join(cert_dir, f)).st_mode) == 0o600 for f in files)
    assert Path(cert_dir, "client.key").read_bytes() == key
    await api.close()
    assert not os.path.exists(cert_dir)
    await api.close()  # twice is harmless

    dropped = KubeAPI.from_connection_info(info)  # never closed: removed when collected (or at exit)
    lost = dropped.cert_dir
    assert lost is not None and os.path.exists(lost)
    del dropped
    import gc

    gc.collect()
    assert not os.path.exists(lost)
