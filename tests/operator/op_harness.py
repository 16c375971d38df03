"""Helpers for kaito.operator tests: the Kubernetes emulator and a running operator.

`emulator` is kmock's KubernetesEmulator on a free 127.0.0.1 port with the
bundled built-in resources plus the Workspace and NodeClaim resources; the
`operator` fixture runs the real Kopf operator (clusterwide) against it in
this event loop and stops it after the test.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import yaml
from kaito.operator.settings import OperatorSettings

# The seed's manifests, as users write them: the copy kept in the repo
# (tests/test_examples.py proves it equals ../shared/examples where that exists).
EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"

WS = "kaito.sh/v1beta1/workspaces"
NC = "karpenter.sh/v1/nodeclaims"


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server maintains.

    Kopf guards its JSON patches with a test on metadata.resourceVersion and
    our reconciler reports observedGeneration, so objects get a uid,
    creationTimestamp, generation (bumped by non-status patches) and an
    increasing resourceVersion, as on a real cluster.
    """

    KEEP_REQUESTS = 64

    @property
    def log(self) -> list[Any]:
        """Every request served (kept here: kmock's own list is trimmed, see _handle)."""
        try:
            return self.__dict__["_log"]
        except KeyError:
            return self.__dict__.setdefault("_log", [])

    @property
    def failures(self) -> dict[tuple[str, str], int]:
        """(METHOD, path) -> how many more requests to fail with HTTP 500 (API outage drills)."""
        return self.__dict__.setdefault("_failures", {})

    async def _handle(self, request: Any) -> Any:
        self.log.append(request)
        key = (str(request.method).upper().rsplit(".", 1)[-1], request.url.path)
        if self.failures.get(key):
            self.failures[key] -= 1
            raise kmock.KubernetesError(status=500, reason="InternalError", message="etcd is having a bad day")
        # kmock re-filters all past requests on every request (quadratic); keep only recent ones.
        if len(self._requests) > self.KEEP_REQUESTS:
            del self._requests[: -self.KEEP_REQUESTS]
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            meta["resourceVersion"] = _next_rv()
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            rv = _next_rv()
            spec_change = request.subresource is None and (
                (isinstance(data, dict) and any(k not in ("metadata", "status") for k in data))
                or (isinstance(data, list) and any(not str(op.get("path", "")).startswith(("/metadata", "/status")) for op in data))
            )
            key = (request.resource, request.namespace, request.name)
            if isinstance(data, list) and key in self.objects and not self.objects[key].deleted:
                current = self.objects[key].raw.get("metadata", {}).get("resourceVersion")
                for op in data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != current:
                        # The API server answers a failed JSON-patch test with 422; Kopf then re-reads.
                        raise kmock.KubernetesError(status=422, reason="Invalid", message="the test operation failed")
            gen = None
            if spec_change and key in self.objects and not self.objects[key].deleted:
                gen = int(self.objects[key].raw.get("metadata", {}).get("generation") or 1) + 1
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {}) if isinstance(data.get("metadata", {}), dict) else {}
                meta["resourceVersion"] = rv
                if gen:
                    meta["generation"] = gen
            elif isinstance(data, list):
                data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})
                if gen:
                    data.append({"op": "replace", "path": "/metadata/generation", "value": gen})
        return await super()._handle(request)


_RV = itertools.count(1000)


def _next_rv() -> str:
    return str(next(_RV))


@dataclass
class Cluster:
    """The emulator and its URL."""

    k8s: Any
    url: str


def declare_resources(k8s: kmock.KubernetesEmulator) -> None:
    k8s.resources.load_bundled()
    for version in ("v1alpha1", "v1beta1"):  # the CRD serves both
        k8s.resources[f"kaito.sh/{version}/workspaces"] = kmock.ResourceInfo(
            kind="Workspace", singular="workspace", namespaced=True, shortnames={"wk", "wks"},
            subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        )
    k8s.resources[NC] = kmock.ResourceInfo(
        kind="NodeClaim", singular="nodeclaim", namespaced=False,
        subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    )


def make_settings(**kw: Any) -> OperatorSettings:
    base = {"webhook_port": 0, "webhook_cert_dir": None, "resync_seconds": 1.0, "retry_seconds": 0.5}
    base.update(kw)
    return OperatorSettings(**base)


class Harness:
    """The running operator plus helpers to drive the emulator like a cluster would."""

    def __init__(self, k8s: Any, state: Any):
        self.k8s = k8s
        self.state = state

    @property
    def api(self) -> Any:
        assert self.state.api is not None
        return self.state.api

    async def create_workspace(self, body: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        # A real API server serves the v1alpha1 object at v1beta1 (conversion None).
        body["apiVersion"] = "kaito.sh/v1beta1"
        async with self.k8s.post(f"/apis/kaito.sh/v1beta1/namespaces/{namespace}/workspaces", json=body) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    def obj(self, resource: str, ns: Any, name: str) -> Any:
        try:
            obj = self.k8s.objects[resource, ns, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def objects(self, resource: str) -> list[dict[str, Any]]:
        return [
            self.k8s.objects[k].raw
            for k in list(self.k8s.objects)
            if _res(k[0]) == resource and not self.k8s.objects[k].deleted
        ]

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        async with self.k8s.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status < 300, await r.text()

    async def add_node(self, name: str, labels: dict[str, str], ready: bool = True) -> None:
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }
        async with self.k8s.post("/api/v1/nodes", json=node) as r:
            assert r.status < 300, await r.text()

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or pred}")

    def condition(self, ns: str, name: str, ctype: str) -> Any:
        ws = self.obj(WS, ns, name)
        for c in ((ws or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == ctype:
                return c
        return None

    async def settled(self, ns: str, name: str) -> None:
        """Wait until Kopf finished the workspace's handlers (diff-base stored, no progress left)."""

        def done() -> bool:
            ann = ((self.obj(WS, ns, name) or {}).get("metadata") or {}).get("annotations") or {}
            return "kaito.sh/last-handled-configuration" in ann and "kaito.sh/reconcile" not in ann

        await self.wait_for(done, what=f"Kopf handlers of {ns}/{name} done")

    def write_requests(self) -> list[Any]:
        """Every create/patch/delete the emulator has served so far (ours and Kopf's)."""
        return [req for req in list(self.k8s.log) if str(req.method).upper().endswith(("POST", "PATCH", "PUT", "DELETE"))]


def _res(resource: Any) -> str:
    return f"{resource.group}/{resource.version}/{resource.plural}" if resource.group else f"{resource.version}/{resource.plural}"




async def provision(h: Harness, claim: dict[str, Any]) -> str:
    """Act as Karpenter for one NodeClaim: a Ready node with its labels, the claim marked Ready."""
    name = f"aks-{claim['metadata']['name']}"
    labels = dict(claim["metadata"].get("labels") or {})
    for req in claim["spec"]["requirements"]:
        if req["operator"] == "In":
            labels[req["key"]] = req["values"][0]
    await h.add_node(name, labels)
    await h.patch(
        f"/apis/karpenter.sh/v1/nodeclaims/{claim['metadata']['name']}/status",
        {"status": {"nodeName": name, "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    return name


def fast_exit(settings: Any) -> None:
    """Kopf settings for tests: stop within a fraction of a second instead of seconds."""
    settings.queueing.exit_timeout = 0.1
    settings.background.instant_exit_timeout = 0.05
    settings.watching.server_timeout = 30
