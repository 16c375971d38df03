"""The one module that talks to the Kubernetes API (besides Kopf itself).

Called by `kaito.operator.reconcile` and the handlers. A small async client
over aiohttp, built from the `kopf.ConnectionInfo` the login handler obtained,
so it uses exactly the credentials Kopf uses. Reads return plain dicts;
writes are counted (`writes`) so tests and the benchmark can prove a no-op
reconcile writes nothing. Errors become `APIError` with the method, path and
the server's message (never the credentials).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

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
    "Workspace": Kind("kaito.sh/v1beta1", "workspaces", True),
}


USER_AGENT = f"kaito-operator/{KAITO_VERSION}"


class APIError(Exception):
    def __init__(self, status: int, what: str, message: str):
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {message}")


def _labels_match(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeAPI:
    """Async CRUD on the kinds in KINDS; one aiohttp session per client."""

    def __init__(self, server: str, headers: dict[str, str] | None = None, ssl_ctx: Any = None):
        self.server = server.rstrip("/")
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._ssl = ssl_ctx
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0

    @classmethod
    def from_connection_info(cls, info: Any) -> KubeAPI:
        """Build from a kopf.ConnectionInfo (token, basic auth, client certs, CA)."""
        headers: dict[str, str] = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            raw = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {raw}"
        ssl_ctx: Any = None
        if info.server.startswith("https"):
            if info.insecure:
                ssl_ctx = False
            else:
                cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
                ssl_ctx = ssl.create_default_context(cafile=info.ca_path, cadata=cadata)
                cert, key = info.certificate_path, info.private_key_path
                if info.certificate_data and info.private_key_data:
                    cert, key = _tempfile(info.certificate_data), _tempfile(info.private_key_data)
                if cert and key:
                    ssl_ctx.load_cert_chain(cert, key)
        return cls(info.server, headers, ssl_ctx)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
            self._session = aiohttp.ClientSession(headers=self._headers)
        if method != "GET":
            self.writes += 1
        data = json.dumps(body) if body is not None else None
        try:
            async with self._session.request(
                method, self.server + path, data=data, headers={"Content-Type": ctype}, ssl=self._ssl
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        message = json.loads(text).get("message", text)
                    except (ValueError, AttributeError):
                        message = text[:200]
                    raise APIError(resp.status, f"{method} {path}", message)
                return json.loads(text) if text else None
        except aiohttp.ClientError as e:
            raise APIError(0, f"{method} {path}", f"connection failed: {e}") from None

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


def _tempfile(data: Any) -> str:
    raw = data if isinstance(data, bytes) else str(data).encode()
    # ssl.load_cert_chain reads only files; kubeconfigs may embed the client cert as data.
    with tempfile.NamedTemporaryFile(prefix="kaito-", delete=False) as f:
        f.write(raw)
    os.chmod(f.name, 0o600)
    return f.name
