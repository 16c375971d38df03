"""The one module that talks to the Kubernetes API (besides Kopf itself).

Called by `kaito.operator.reconcile` and the handlers. A small async client
over aiohttp, built from the `kopf.ConnectionInfo` the login handler obtained,
so it uses exactly the credentials Kopf uses. Reads return plain dicts;
writes are counted (`writes`, once per call whatever the retries) so tests and
the benchmark can prove a no-op reconcile writes nothing. Every request has a
connect and a total timeout and is retried by the project's one policy
(`kaito.presets.retry`) on 429, 5xx and dropped connections, honouring
`Retry-After`; a POST (not idempotent) only when no request reached the server
or the server said 429/503 (it did not act). Errors become `APIError` with the
method, path and the server's message (never the credentials). Client
certificates given as data live in a private temporary directory, removed on
`close()` and at exit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import ssl
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from kaito.operator import schema
from kaito.presets.retry import Backoff, TransientError, acall, retryable_status
from kaito.presets.version import KAITO_VERSION


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool

    def base(self) -> str:
        return f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("v1", "configmaps", True),
    "Service": Kind("v1", "services", True),
    "Event": Kind("v1", "events", True),
    "Node": Kind("v1", "nodes", False),
    "Deployment": Kind("apps/v1", "deployments", True),
    "StatefulSet": Kind("apps/v1", "statefulsets", True),
    "Job": Kind("batch/v1", "jobs", True),
    "NodeClaim": Kind("karpenter.sh/v1", "nodeclaims", False),
    "Workspace": Kind(f"{schema.GROUP}/{schema.STORAGE_VERSION}", schema.PLURAL, True),
}


log = logging.getLogger(__name__)
USER_AGENT = f"kaito-operator/{KAITO_VERSION}"
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60.0, connect=10.0)
DEFAULT_POLICY = Backoff(attempts=5, base=0.5, cap=30.0)
# Statuses that say the server did not act on the request: safe to resend even a POST.
NOT_ACTED = frozenset({429, 503})


class APIError(Exception):
    """A failed API call; `status` 0 when no HTTP answer came (connection failed or timed out)."""

    def __init__(self, status: int, what: str, message: str):
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {message}" if status else f"{what}: {message}")


class _Transient(TransientError):
    """A try that another may cure; carries the APIError to raise when the tries run out."""

    def __init__(self, error: APIError, retry_after: str | None = None):
        super().__init__(str(error), status=error.status, retry_after=retry_after)
        self.error = error


def _labels_match(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeAPI:
    """Async CRUD on the kinds in KINDS; one aiohttp session per client."""

    def __init__(
        self,
        server: str,
        headers: dict[str, str] | None = None,
        ssl_ctx: Any = None,
        *,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        policy: Backoff = DEFAULT_POLICY,
        cert_dir: str | None = None,
    ):
        self.server = server.rstrip("/")
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._ssl = ssl_ctx
        self._timeout = timeout
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0
        self.cert_dir = cert_dir
        # Removes the key material at close(), at garbage collection, or at interpreter exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, cert_dir, True) if cert_dir else None

    @classmethod
    def from_connection_info(cls, info: Any, settings: Any = None) -> KubeAPI:
        """Build from a kopf.ConnectionInfo (token, basic auth, client certs, CA).

        `settings` (an OperatorSettings) gives the timeouts and the number of tries.
        """
        headers: dict[str, str] = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            raw = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {raw}"
        ssl_ctx, cert_dir = _ssl_context(info)
        kwargs: dict[str, Any] = {"cert_dir": cert_dir}
        if settings is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(
                total=settings.api_timeout_seconds, connect=settings.api_connect_timeout_seconds
            )
            kwargs["policy"] = Backoff(attempts=settings.api_attempts, base=DEFAULT_POLICY.base, cap=DEFAULT_POLICY.cap)
        return cls(info.server, headers, ssl_ctx, **kwargs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._cleanup is not None:
            self._cleanup()

    def _url(self, kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
        k = KINDS[kind]
        path = k.base()
        if k.namespaced and namespace:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{k.plural}"
        if name:
            path += f"/{quote(name)}"
        if sub:
            path += f"/{sub}"
        return path

    async def _request(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        if method != "GET":
            self.writes += 1
        data = json.dumps(body) if body is not None else None
        try:
            return await acall(
                lambda: self._try(method, path, data, ctype),
                policy=self._policy,
                transient=(_Transient,),
                on_retry=lambda e, wait: log.info("%s; retrying in %.1fs", e, wait),
            )
        except _Transient as e:
            raise e.error from None

    async def _try(self, method: str, path: str, data: str | None, ctype: str) -> Any:
        """One try: the decoded answer, APIError (final) or _Transient (worth another try)."""
        what = f"{method} {path}"
        assert self._session is not None
        try:
            async with self._session.request(
                method, self.server + path, data=data, headers={"Content-Type": ctype}, ssl=self._ssl
            ) as resp:
                text = await resp.text()
                if resp.status < 400:
                    return json.loads(text) if text else None
                error = APIError(resp.status, what, _server_message(text))
                if retryable_status(resp.status) and (method != "POST" or resp.status in NOT_ACTED):
                    raise _Transient(error, resp.headers.get("Retry-After"))
                raise error
        except aiohttp.ClientConnectorError as e:  # no connection: the server saw nothing
            raise _Transient(APIError(0, what, f"connection failed: {e}")) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error = APIError(0, what, f"connection failed: {e or type(e).__name__}")
            if method == "POST":  # the server may have acted: resending could create twice
                raise error from None
            raise _Transient(error) from None

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", self._url(kind, namespace, name))
        except APIError as e:
            if e.status == 404:
                return None
            raise

    async def list(
        self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        path = self._url(kind, namespace)
        if labels:
            path += "?labelSelector=" + quote(",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        try:
            doc = await self._request("GET", path)
        except APIError as e:
            if e.status == 404:  # the kind is not served (e.g. no Karpenter installed)
                return []
            raise
        items = (doc or {}).get("items") or []
        # Filter again: not every server (e.g. test emulators) honours labelSelector.
        return [i for i in items if not labels or _labels_match(i, labels)]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self._request("POST", self._url(obj["kind"], meta.get("namespace")), obj)

    async def patch(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any], subresource: str = ""
    ) -> dict[str, Any]:
        return await self._request(
            "PATCH", self._url(kind, namespace, name, subresource), patch, "application/merge-patch+json"
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        try:
            await self._request("DELETE", self._url(kind, namespace, name))
            return True
        except APIError as e:
            if e.status == 404:
                return False
            raise


def _server_message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return text[:200]


def _ssl_context(info: Any) -> tuple[Any, str | None]:
    """(the ssl argument for aiohttp, the private directory holding the client key or None)."""
    if not info.server.startswith("https"):
        return None, None
    if info.insecure:
        return False, None
    cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
    ctx = ssl.create_default_context(cafile=info.ca_path, cadata=cadata)
    cert, key, cert_dir = info.certificate_path, info.private_key_path, None
    if info.certificate_data and info.private_key_data:
        # ssl.load_cert_chain reads only files; kubeconfigs may embed the client cert and key
        # as data. They live in a 0700 directory as 0600 files until the client is closed.
        cert_dir = tempfile.mkdtemp(prefix="kaito-kube-")
        cert = _private_file(cert_dir, "client.crt", info.certificate_data)
        key = _private_file(cert_dir, "client.key", info.private_key_data)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx, cert_dir


def _private_file(directory: str, name: str, data: Any) -> str:
    raw = data if isinstance(data, bytes) else str(data).encode()
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path
