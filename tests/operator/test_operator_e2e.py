"""The real Kopf operator against kmock's Kubernetes emulator: every seed example end to end.

A test here plays the rest of the cluster: it provisions nodes for NodeClaims
(as Karpenter would) and patches Deployment/StatefulSet/Job status (as the
kubelet and controllers would), then checks the operator's children and
conditions.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from kaito.operator import deploy
from op_harness import NC, WS, Harness, load_example, provision

pytestmark = pytest.mark.timeout(90)

NS = "default"


def _status(h: Harness, name: str, ctype: str) -> Any:
    c = h.condition(NS, name, ctype)
    return c and c["status"]


async def _provision_all(h: Harness) -> list[str]:
    claims = await h.wait_for(lambda: h.objects(NC), what="NodeClaims")
    return [await provision(h, c) for c in claims]


async def _quiet_writes(h: Harness, seconds: float) -> list[Any]:
    """Writes served during `seconds` of steady state (timers tick every second in tests)."""
    before = len(h.write_requests())
    await asyncio.sleep(seconds)
    return h.write_requests()[before:]


async def test_inference_example_end_to_end(operator_factory: Any) -> None:
    h: Harness = await operator_factory()
    body = load_example("workspace-phi-3-mini.yaml")
    name = body["metadata"]["name"]
    await h.create_workspace(body)

    claim = (await h.wait_for(lambda: h.objects(NC), what="NodeClaim"))[0]
    assert claim["metadata"]["labels"]["kaito.sh/workspace"] == name
    await h.wait_for(lambda: _status(h, name, "ResourceReady") == "False", what="ResourceReady False")
    assert h.obj("apps/v1/deployments", NS, name) is None  # workloads wait for the GPU nodes

    node = await provision(h, claim)
    await h.wait_for(lambda: _status(h, name, "ResourceReady") == "True", what="ResourceReady")
    assert _status(h, name, "NodeClaimReady") == "True"
    dep = await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment")
    assert h.obj("v1/services", NS, name)["spec"]["ports"][0]["targetPort"] == 5000
    assert h.obj("v1/configmaps", NS, f"{name}-inference-config") is not None
    ws = h.obj(WS, NS, name)
    assert dep["metadata"]["ownerReferences"][0]["uid"] == ws["metadata"]["uid"]
    assert ws["status"]["workerNodes"] == [node]
    assert "workspace.finalizer.kaito.sh" in ws["metadata"]["finalizers"]
    assert _status(h, name, "InferenceReady") == "False"

    await h.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", {"status": {"readyReplicas": 1}})
    await h.wait_for(lambda: _status(h, name, "WorkspaceSucceeded") == "True", what="WorkspaceSucceeded")
    assert _status(h, name, "InferenceReady") == "True"
    assert _status(h, name, "WorkspaceReady") == "True"  # the seed's WORKSPACEREADY column
    cond = h.condition(NS, name, "InferenceReady")
    assert cond["observedGeneration"] == 1 and cond["reason"] and cond["message"]

    # Steady state: timer passes and the watch's replays must not write anything.
    await h.settled(NS, name)
    writes = await _quiet_writes(h, 2.5)
    assert writes == [], [(w.method, w.url, w.data) for w in writes]
    assert h.state.passes >= 3

    # Deletion: the finalizer removes the NodeClaim, then the workspace goes.
    async with h.k8s.delete(f"/apis/kaito.sh/v1beta1/namespaces/{NS}/workspaces/{name}") as r:
        assert r.status < 300
    await h.wait_for(lambda: not h.objects(NC), what="NodeClaim deleted")
    await h.wait_for(lambda: h.obj(WS, NS, name) is None, what="workspace deleted")
    _assert_rbac_allows(h)


def _assert_rbac_allows(h: Harness) -> None:
    """Every request the operator (and Kopf) made is granted by deploy's ClusterRole."""
    allowed = {(g, r, v) for g, rs, vs in deploy.RBAC_RULES for r in rs for v in vs}
    checked = 0
    for req in list(h.k8s.log):
        res = req.resource
        agent = req.headers.get("User-Agent", "")
        if res is None or res.plural is None or not agent.startswith(("kopf/", "kaito-operator/")):  # skip the test's own requests
            continue
        checked += 1
        method = str(req.method).upper().rsplit(".", 1)[-1]
        verb = {
            "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update",
        }.get(method) or ("watch" if req.params.get("watch") else ("get" if req.name else "list"))
        plural = f"{res.plural}/{req.subresource}" if req.subresource else res.plural
        assert (res.group, plural, verb) in allowed, f"RBAC misses {verb} {res.group}/{plural}"
    assert checked > 20


async def test_adapter_example_and_adapter_change_rolls_pods(operator_factory: Any) -> None:
    h: Harness = await operator_factory(bring_your_own_nodes=True)
    body = load_example("workspace-phi-3-mini-adapter.yaml")
    name = body["metadata"]["name"]
    await h.create_workspace(body)
    await h.wait_for(lambda: _status(h, name, "ResourceReady") == "False", what="waiting for own nodes")
    await h.add_node("byo-gpu-0", {"apps": "phi-3-adapter", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
    dep = await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment")
    assert h.objects(NC) == []  # bring-your-own-nodes: no NodeClaims
    pod = dep["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-1] == "/mnt/adapter/phi-3-adapter"
    assert {"name": "phi-3-adapter", "value": "1.0"} in pod["containers"][0]["env"]

    adapters = [{"source": body["inference"]["adapters"][0]["source"], "strength": "0.25"}]
    await h.patch(f"/apis/kaito.sh/v1beta1/namespaces/{NS}/workspaces/{name}", {"inference": {"adapters": adapters}})

    def rolled() -> bool:
        d = h.obj("apps/v1/deployments", NS, name)
        return {"name": "phi-3-adapter", "value": "0.25"} in d["spec"]["template"]["spec"]["containers"][0]["env"]

    await h.wait_for(rolled, what="Deployment patched with the new strength")
    await h.wait_for(lambda: (h.condition(NS, name, "ResourceReady") or {}).get("observedGeneration") == 2,
                     what="observedGeneration 2")


async def test_tuning_example_succeeds_and_failure_is_reported(operator_factory: Any) -> None:
    h: Harness = await operator_factory()
    ok = load_example("workspace-tuning-phi-3.yaml")
    bad = load_example("workspace-tuning-phi-3.yaml")
    bad["metadata"]["name"] = "tuning-fails"
    await h.create_workspace(ok)
    await h.create_workspace(bad)
    await h.wait_for(lambda: len(h.objects(NC)) == 2, what="two NodeClaims")
    await _provision_all(h)
    for name in (ok["metadata"]["name"], "tuning-fails"):
        job = await h.wait_for(lambda n=name: h.obj("batch/v1/jobs", NS, n), what=f"Job {name}")
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        await h.wait_for(lambda n=name: _status(h, n, "JobStarted") == "True", what="JobStarted")
    assert h.obj("v1/configmaps", NS, f"{ok['metadata']['name']}-tuning-config") is not None

    await h.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/{ok['metadata']['name']}/status",
                  {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    await h.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tuning-fails/status",
                  {"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                   "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}})
    await h.wait_for(lambda: _status(h, ok["metadata"]["name"], "WorkspaceSucceeded") == "True", what="succeeded")
    await h.wait_for(lambda: _status(h, "tuning-fails", "WorkspaceSucceeded") == "False"
                     and h.condition(NS, "tuning-fails", "WorkspaceSucceeded")["reason"] == "TuningFailed",
                     what="failure reported")
    assert "backoff limit" in h.condition(NS, "tuning-fails", "WorkspaceSucceeded")["message"]


async def test_multi_node_statefulset_becomes_ready(operator_factory: Any) -> None:
    h: Harness = await operator_factory()
    body = load_example("workspace-phi-3-mini.yaml")
    body["metadata"]["name"] = "falcon"
    body["inference"]["preset"]["name"] = "falcon-40b"
    body["resource"].update(count=2, instanceType="Standard_NC24ads_A100_v4")
    await h.create_workspace(body)
    await h.wait_for(lambda: len(h.objects(NC)) == 2, what="two NodeClaims")
    nodes = await _provision_all(h)
    sts = await h.wait_for(lambda: h.obj("apps/v1/statefulsets", NS, "falcon"), what="StatefulSet")
    assert h.obj("v1/services", NS, "falcon-headless")["spec"]["clusterIP"] == "None"
    assert sts["spec"]["replicas"] == 2
    await h.patch(f"/apis/apps/v1/namespaces/{NS}/statefulsets/falcon/status", {"status": {"readyReplicas": 2}})
    await h.wait_for(lambda: _status(h, "falcon", "InferenceReady") == "True", what="InferenceReady")
    assert sorted(h.obj(WS, NS, "falcon")["status"]["workerNodes"]) == sorted(nodes)


async def test_invalid_spec_ends_in_false_condition_and_event(operator_factory: Any) -> None:
    h: Harness = await operator_factory()
    body = load_example("workspace-phi-3-mini.yaml")
    body["inference"]["preset"]["name"] = "phi-3-mega"
    body["resource"]["instanceType"] = "Standard_D2s_v3"
    await h.create_workspace(body)
    name = body["metadata"]["name"]
    cond = await h.wait_for(lambda: h.condition(NS, name, "WorkspaceSucceeded"), what="condition")
    assert cond["status"] == "False" and cond["reason"] == "InvalidWorkspace"
    assert "inference.preset.name" in cond["message"] and "resource.instanceType" in cond["message"]
    events = await h.wait_for(
        lambda: [e for e in h.objects("v1/events") if e.get("reason") == "InvalidWorkspace"], what="Event"
    )
    assert "phi-3-mega" in events[0]["message"]
    assert h.objects(NC) == [] and h.obj("apps/v1/deployments", NS, name) is None
    # The handler applies the preset/SKU count bound too (a cluster without the webhook).
    many = load_example("workspace-phi-3-mini.yaml")
    many["metadata"]["name"] = "too-many"
    many["resource"]["count"] = 17
    await h.create_workspace(many)
    cond = await h.wait_for(lambda: h.condition(NS, "too-many", "WorkspaceSucceeded"), what="count condition")
    assert cond["reason"] == "InvalidWorkspace" and cond["message"].startswith(
        "resource.count: 17 is too many for preset phi-3-mini-4k-instruct on Standard_NC6s_v3: allowed 1 to 16"
    )
    assert h.objects(NC) == []
    # Permanent: no retry storm; the timer re-checks without writing.
    await asyncio.sleep(0.5)
    assert await _quiet_writes(h, 2.0) == []


async def test_validating_webhook_is_served(operator_factory: Any, unused_tcp_port: int) -> None:
    h: Harness = await operator_factory(webhook_port=unused_tcp_port, max_replicas=2)
    assert h is not None
    body = load_example("workspace-tuning-phi-3.yaml")

    async def review(obj: dict[str, Any], old: Any = None, op: str = "CREATE") -> dict[str, Any]:
        # The API server converts a v1alpha1 object to v1beta1 (matchPolicy Equivalent) before calling us.
        for o in (obj, old):
            if o:
                o["apiVersion"] = "kaito.sh/v1beta1"
        req = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "operation": op, "object": obj, "oldObject": old,
                "kind": {"group": "kaito.sh", "version": "v1beta1", "kind": "Workspace"},
                "resource": {"group": "kaito.sh", "version": "v1beta1", "resource": "workspaces"},
                "userInfo": {"username": "alice"}, "namespace": NS, "name": obj["metadata"]["name"],
                "dryRun": False, "options": None,
            },
        }
        url = f"http://127.0.0.1:{unused_tcp_port}/validate-workspace"
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s, s.post(url, json=req) as r:
                    if r.status == 404:  # Kopf serves webhooks once it has discovered the resources
                        await asyncio.sleep(0.1)
                        continue
                    return (await r.json())["response"]
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        raise AssertionError("webhook server not listening")

    assert (await review(body))["allowed"] is True
    bad = load_example("workspace-tuning-phi-3.yaml")
    bad["resource"]["count"] = 2
    resp = await review(bad)
    assert resp["allowed"] is False and "resource.count" in resp["status"]["message"]
    changed = load_example("workspace-tuning-phi-3.yaml")
    changed["tuning"]["method"] = "lora"
    resp = await review(changed, body, "UPDATE")
    assert resp["allowed"] is False and "tuning.method: is immutable" in resp["status"]["message"]
    # The operator's KAITO_MAX_REPLICAS reaches the webhook.
    replicas = load_example("workspace-phi-3-mini.yaml")
    replicas["resource"]["count"] = 2
    assert (await review(replicas))["allowed"] is True
    replicas["resource"]["count"] = 3
    resp = await review(replicas)
    assert resp["allowed"] is False and "allowed 1 to 2" in resp["status"]["message"]


async def test_api_errors_are_retried_not_fatal(operator_factory: Any) -> None:
    h: Harness = await operator_factory(bring_your_own_nodes=True)
    await h.add_node("gpu-0", {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
    body = load_example("workspace-phi-3-mini.yaml")
    name = body["metadata"]["name"]
    h.k8s.failures[("POST", f"/apis/apps/v1/namespaces/{NS}/deployments")] = 3
    await h.create_workspace(body)
    await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment after the outage")
    assert h.k8s.failures[("POST", f"/apis/apps/v1/namespaces/{NS}/deployments")] == 0
    assert h.obj("v1/services", NS, name) is not None


async def test_named_training_config_is_waited_for_and_checked(operator_factory: Any) -> None:
    h: Harness = await operator_factory(bring_your_own_nodes=True)
    await h.add_node("gpu-0", {"app": "tuning-phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
    body = load_example("workspace-tuning-phi-3.yaml")
    body["tuning"]["config"] = "my-training"
    name = body["metadata"]["name"]
    await h.create_workspace(body)
    cond = await h.wait_for(lambda: h.condition(NS, name, "WorkspaceSucceeded"), what="pending condition")
    assert cond["reason"] == "Pending" and "my-training" in cond["message"]
    assert h.obj("batch/v1/jobs", NS, name) is None
    lora = "training_config:\n  LoraConfig: {r: 8}\n"  # no quantization: wrong for qlora
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "my-training", "namespace": NS},
          "data": {"training_config.yaml": lora}}
    async with h.k8s.post(f"/api/v1/namespaces/{NS}/configmaps", json=cm) as r:
        assert r.status < 300
    await h.wait_for(lambda: (h.condition(NS, name, "WorkspaceSucceeded") or {}).get("reason") == "InvalidWorkspace",
                     what="invalid config reported")
    assert "load_in_4bit" in h.condition(NS, name, "WorkspaceSucceeded")["message"]
    assert h.obj("batch/v1/jobs", NS, name) is None


async def test_update_of_an_immutable_field_is_refused_by_the_handler(operator_factory: Any) -> None:
    h: Harness = await operator_factory(bring_your_own_nodes=True)
    await h.add_node("gpu-0", {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
    body = load_example("workspace-phi-3-mini.yaml")
    name = body["metadata"]["name"]
    await h.create_workspace(body)
    await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment")
    await h.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", {"status": {"readyReplicas": 1}})
    await h.settled(NS, name)
    await h.patch(f"/apis/kaito.sh/v1beta1/namespaces/{NS}/workspaces/{name}",
                  {"resource": {"instanceType": "Standard_NC24ads_A100_v4"}})
    await h.wait_for(lambda: (h.condition(NS, name, "WorkspaceSucceeded") or {}).get("reason") == "InvalidWorkspace",
                     what="immutability reported")
    assert "resource.instanceType: is immutable" in h.condition(NS, name, "WorkspaceSucceeded")["message"]
    # Timer passes keep refusing it (the pinned spec), and the Deployment was not touched.
    await asyncio.sleep(2.0)
    assert h.condition(NS, name, "WorkspaceSucceeded")["reason"] == "InvalidWorkspace"
    assert h.obj("apps/v1/deployments", NS, name)["metadata"]["generation"] == 1
