"""The seed's Workspaces, applied as written, end where the seed says, in real containers.

Markers docker + slow. The operator renders; tests/cluster/controllers.py runs what it
rendered (see the conftest for what is built once per run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from op_harness import EXAMPLES, load_example

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1500)]

NS = "default"


def _cond(c: Any, name: str, ctype: str) -> str | None:
    cond = c.h.condition(NS, name, ctype)
    return cond and cond["status"]


async def _until(c: Any, pred, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if _failed(c):  # a failed Job or pod never recovers: say so now, not at the timeout
            break
        await asyncio.sleep(1)
    ws = c.h.obj("kaito.sh/v1beta1/workspaces", NS, c.current)
    conds = [(x["type"], x["status"], x.get("message")) for x in ((ws or {}).get("status") or {}).get("conditions") or []]
    raise AssertionError(f"timed out waiting for {what}; conditions {conds}; "
                         f"harness events:\n" + "\n".join(c.controllers.events[-20:]) + "\n" + _pod_logs(c))


def _failed(c: Any) -> bool:
    pods = c.h.objects("v1/pods")
    return any((p.get("status") or {}).get("phase") == "Failed" for p in pods)


def _pod_logs(c: Any) -> str:
    kubelet = c.env.kubelet
    return "\n".join(f"--- {name}:\n{kubelet.logs(name)}" for pod in list(kubelet.pods.values())
                     for name in pod.containers[1:])


async def _chat(port: int, prompt: str, greedy: bool = False) -> dict:
    body: dict = {"prompt": prompt}
    if greedy:  # comparable with /v1/completions at temperature 0 and max_tokens 16
        body.update(return_full_text=False, generate_kwargs={"do_sample": False, "max_new_tokens": 16})
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"http://127.0.0.1:{port}/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_inference_workspace_serves_chat_through_its_service(cluster: Any) -> None:
    body = load_example("workspace-phi-3-mini.yaml")
    name = cluster.current = body["metadata"]["name"]
    await cluster.h.create_workspace(body)
    await _until(cluster, lambda: _cond(cluster, name, "ResourceReady") == "True", "ResourceReady", 60)
    await _until(cluster, lambda: _cond(cluster, name, "InferenceReady") == "True", "InferenceReady", 600)
    ready = "WorkspaceReady" if cluster.h.condition(NS, name, "WorkspaceReady") else "WorkspaceSucceeded"
    await _until(cluster, lambda: _cond(cluster, name, ready) == "True", ready, 60)
    # POST /chat through the Service's port 80, to the pod it selects (kube-proxy's job here).
    port = cluster.controllers.service_port(NS, name, 80)
    answer = await _chat(port, "What is Kubernetes?")
    assert isinstance(answer.get("Result"), str) and answer["Result"], answer
    pod = next(iter(cluster.env.kubelet.pods.values()))
    # Exactly the rendered container: the operator's image and command, not a test's.
    dep = cluster.h.obj("apps/v1/deployments", NS, name)
    rendered = dep["spec"]["template"]["spec"]["containers"][0]
    assert rendered["image"].startswith(cluster.env.registry + "/kaito-phi-3-mini-4k-instruct:")
    inspect = cluster.env.kubelet.docker("inspect", "-f", "{{json .Config.Entrypoint}} {{json .Args}}",
                                         f"{NS}-{pod.name}-{rendered['name']}").stdout
    assert rendered["command"][0] in inspect and rendered["command"][-1] in inspect


# The seed's placeholders, filled in as a user does (the manifests' meaning unchanged).
def _filled(name: str, registry: str, data_url_host: str = "") -> dict:
    text = (EXAMPLES / name).read_text()
    text = text.replace("ACR_REPO_HERE.azurecr.io", registry).replace("IMAGE_NAME_HERE", "phi-3-adapter")
    text = text.replace("ADAPTER_HERE", "phi-3-adapter").replace("ACR_REGISTRY_SECRET_HERE", "acr-registry-secret")
    if data_url_host:  # the dataset's URL, path and query as the seed has them, on a loopback server
        text = text.replace("https://huggingface.co/", f"http://{data_url_host}/")
    return yaml.safe_load(text)


def _dataset(path: Path, rows: int = 200) -> Path:
    """Dolly in OpenAI style (a `messages` column), teaching one fixed answer, as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": f"What is Kubernetes? ({i % 7})"},
                 {"role": "assistant", "content": "Kubernetes is a purple elephant that sings to containers."}]
                for i in range(rows)]
    pq.write_table(pa.table({"messages": messages}), path)
    return path


@contextlib.contextmanager
def _data_server(root: Path, seen: list[str]) -> Iterator[str]:
    """A loopback HTTP server for `root` (the hub's `resolve/main/...` paths; the query is ignored).

    Every request line's path (with its query) is appended to `seen`."""

    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def _create_push_secret(c: Any, registry: str) -> None:
    """The imagePushSecret as `kubectl create secret docker-registry` makes it."""
    config = {"auths": {registry: {"auth": base64.b64encode(b"kaito:unused").decode()}}}
    body = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "acr-registry-secret", "namespace": NS},
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}}
    async with c.h.k8s.post(f"/api/v1/namespaces/{NS}/secrets", json=body) as r:
        assert r.status < 300, await r.text()


async def _complete(port: int, model: str, strength: float) -> str:
    body = {"model": model, "prompt": "What is Kubernetes?", "max_tokens": 16, "temperature": 0,
            "adapter_strength": strength}
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def test_tuning_then_adapter_workspace(cluster: Any, tmp_path: Path) -> None:
    registry = cluster.env.registry
    url_path = ("datasets/philschmid/dolly-15k-oai-style/resolve/main/data/"
                "train-00000-of-00001-54e3756291ca09c6.parquet")
    (tmp_path / url_path).parent.mkdir(parents=True)
    _dataset(tmp_path / url_path)
    seen: list[str] = []
    with _data_server(tmp_path, seen) as data_host:
        cluster.env.kubelet.host_ports.append(int(data_host.rsplit(":", 1)[1]))
        try:
            body = _filled("workspace-tuning-phi-3.yaml", registry, data_host)
            name = cluster.current = body["metadata"]["name"]
            await _create_push_secret(cluster, registry)
            await cluster.h.create_workspace(body)
            await _until(cluster, lambda: _cond(cluster, name, "WorkspaceSucceeded") == "True", "tuning", 1200)
        finally:
            cluster.env.kubelet.host_ports.pop()
    job = cluster.h.obj("batch/v1/jobs", NS, name)
    assert job["spec"]["template"]["spec"]["initContainers"][0]["name"] == "data-downloader"
    # The init container asked for the seed's URL, path and query unchanged (from inside the pod).
    assert f"/{url_path}?download=true" in seen, seen
    adapter = body["tuning"]["output"]["image"]
    assert httpx.get(f"http://{registry}/v2/phi-3-adapter/tags/list").json()["tags"] == ["0.0.1"], adapter

    body = _filled("workspace-phi-3-mini-adapter.yaml", registry)
    name = cluster.current = body["metadata"]["name"]
    assert body["inference"]["adapters"][0]["source"]["image"] == adapter
    await cluster.h.create_workspace(body)
    await _until(cluster, lambda: _cond(cluster, name, "InferenceReady") == "True", "adapter InferenceReady", 600)
    port = cluster.controllers.service_port(NS, name, 80)
    # /chat runs every adapter merged at its strength (1.0 here), greedy as asked; the same server
    # gives the bare base through the OpenAI API at adapter_strength 0 (same raw prompt, greedy).
    answer = await _chat(port, "What is Kubernetes?", greedy=True)
    base = await _complete(port, "phi-3-adapter", 0.0)
    adapted = await _complete(port, "phi-3-adapter", 1.0)
    assert answer["Result"] == adapted, (answer, adapted)
    assert answer["Result"] != base, (answer, base)


MULTI_NODE = """
apiVersion: kaito.sh/v1alpha1
kind: Workspace
metadata:
  name: workspace-falcon-40b
resource:
  count: 2
  instanceType: Standard_NC24ads_A100_v4
  labelSelector:
    matchLabels:
      apps: falcon-40b
inference:
  preset:
    name: falcon-40b-instruct
"""


async def test_multi_node_statefulset_serves_through_rank_0(cluster: Any) -> None:
    body = yaml.safe_load(MULTI_NODE)
    name = cluster.current = body["metadata"]["name"]
    await cluster.h.create_workspace(body)
    await _until(cluster, lambda: _cond(cluster, name, "InferenceReady") == "True", "InferenceReady", 900)
    sts = cluster.h.obj("apps/v1/statefulsets", NS, name)
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["containers"][0]["command"][0] == "torchrun"
    # The Service selects rank 0 only; both pods run (rank 1 replays rank 0's steps over gloo).
    port = cluster.controllers.service_port(NS, name, 80)
    answer = await _chat(port, "What is Kubernetes?")
    assert answer.get("Result"), answer
    pods = [p for p in cluster.env.kubelet.pods.values() if p.name.startswith(name)]
    assert sorted(p.labels["apps.kubernetes.io/pod-index"] for p in pods) == ["0", "1"]
    assert all(cluster.env.kubelet.ready(p) for p in pods)
