"""The preset's readiness timeout: the pure decision, and the real operator reporting it on the emulator.

End-to-end tests shorten the timeout with the operator's test override
(`readiness_timeout_override_seconds`) instead of waiting the preset's 30 minutes.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from kaito.operator import readiness
from kaito.operator.settings import OperatorSettings
from kaito.presets import get_preset
from op_harness import NC, WS, Harness, load_example, provision

NS = "default"
T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


# --- the decision, pure ---------------------------------------------------------------------------


def test_default_timeout_is_the_presets_and_the_override_wins() -> None:
    preset = get_preset("phi-3-mini-4k-instruct")
    assert readiness.timeout_for(preset, OperatorSettings()) == preset.readiness_timeout_seconds == 1800
    assert readiness.timeout_for(None, OperatorSettings()) == 1800
    assert readiness.timeout_for(preset, OperatorSettings(readiness_timeout_override_seconds=2)) == 2.0


def test_timed_out_only_strictly_after_the_timeout_and_never_without_a_start() -> None:
    assert not readiness.timed_out(T0, 1800, T0 + datetime.timedelta(seconds=1800))
    assert readiness.timed_out(T0, 1800, T0 + datetime.timedelta(seconds=1801))
    assert not readiness.timed_out(T0, 1800, T0 + datetime.timedelta(seconds=5))
    assert not readiness.timed_out(None, 1, T0 + datetime.timedelta(days=365))


def test_start_is_our_stamp_else_creation_timestamp() -> None:
    obj: dict[str, Any] = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}}
    assert readiness.started_at(obj) == datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    readiness.mark_started(obj, T0)
    assert obj["metadata"]["annotations"][readiness.ANN_SINCE] == "2026-03-01T12:00:00Z"
    assert readiness.started_at(obj) == T0  # a rollout restarts the wait
    assert readiness.started_at({"metadata": {"creationTimestamp": "garbage"}}) is None
    assert readiness.started_at(None) is None


def test_override_is_read_from_the_environment() -> None:
    assert OperatorSettings.from_env({}).readiness_timeout_override_seconds is None
    env = {"KAITO_READINESS_TIMEOUT_OVERRIDE_SECONDS": "2.5"}
    assert OperatorSettings.from_env(env).readiness_timeout_override_seconds == 2.5


# --- the real operator on the emulator ------------------------------------------------------------

def _cond(h: Harness, name: str, ctype: str) -> dict[str, Any]:
    return h.condition(NS, name, ctype) or {}


def _events(h: Harness, reason: str) -> list[dict[str, Any]]:
    return [e for e in h.objects("v1/events") if e.get("reason") == reason]


def _status_writes(h: Harness, name: str) -> int:
    return sum(
        1
        for r in h.write_requests()
        if r.url.path.endswith(f"/workspaces/{name}/status") and str(r.method).upper().endswith("PATCH")
    )


@pytest.mark.timeout(90)
async def test_deployment_never_ready_times_out_then_recovers(operator_factory: Any) -> None:
    h: Harness = await operator_factory(bring_your_own_nodes=True, readiness_timeout_override_seconds=1.5)
    body = load_example("workspace-phi-3-mini.yaml")
    name = body["metadata"]["name"]
    await h.add_node("gpu-0", {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
    await h.create_workspace(body)
    dep = await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment")
    assert readiness.ANN_SINCE in dep["metadata"]["annotations"]
    # Not before the timeout: first the ordinary wait is reported.
    await h.wait_for(lambda: _cond(h, name, "InferenceReady").get("reason") == "InferencePending", what="pending")

    cond = await h.wait_for(
        lambda: (c := _cond(h, name, "InferenceReady")).get("reason") == readiness.REASON_INFERENCE and c,
        what="readiness timeout",
    )
    assert cond["status"] == "False"
    assert "0/1 replicas ready after 1.5 s" in cond["message"] and "phi-3-mini-4k-instruct" in cond["message"]
    done = _cond(h, name, "WorkspaceSucceeded")
    assert done["status"] == "False" and done["reason"] == readiness.REASON_INFERENCE
    await h.wait_for(lambda: _events(h, readiness.REASON_INFERENCE), what="Warning Event")

    # Reported once: later passes (timer every second, Kopf's retries) rewrite neither.
    writes = _status_writes(h, name)
    await asyncio.sleep(2.5)
    assert _status_writes(h, name) == writes
    events = _events(h, readiness.REASON_INFERENCE)
    assert len(events) == 1 and events[0]["type"] == "Warning" and "after 1.5 s" in events[0]["message"]

    # Still reconciled: pods that become ready late flip the conditions to True.
    await h.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", {"status": {"readyReplicas": 1}})
    await h.wait_for(lambda: _cond(h, name, "InferenceReady").get("status") == "True", what="InferenceReady")
    assert _cond(h, name, "WorkspaceSucceeded")["status"] == "True"
    assert _cond(h, name, "InferenceReady")["reason"] == "InferenceReady"


@pytest.mark.timeout(90)
async def test_nodeclaim_never_ready_times_out_then_recovers(operator_factory: Any) -> None:
    h: Harness = await operator_factory(readiness_timeout_override_seconds=1.0)
    body = load_example("workspace-phi-3-mini.yaml")
    name = body["metadata"]["name"]
    await h.create_workspace(body)
    claim = (await h.wait_for(lambda: h.objects(NC), what="NodeClaim"))[0]
    assert readiness.ANN_SINCE in claim["metadata"]["annotations"]

    cond = await h.wait_for(
        lambda: (c := _cond(h, name, "NodeClaimReady")).get("reason") == readiness.REASON_NODECLAIM and c,
        what="NodeClaim readiness timeout",
    )
    assert cond["status"] == "False" and claim["metadata"]["name"] in cond["message"]
    assert "not Ready after 1 s" in cond["message"] and "phi-3-mini-4k-instruct" in cond["message"]
    res = _cond(h, name, "ResourceReady")
    assert res["status"] == "False" and res["reason"] == readiness.REASON_NODECLAIM
    assert "0 of 1 node(s) ready" in res["message"]
    await h.wait_for(lambda: _events(h, readiness.REASON_NODECLAIM), what="Warning Event")
    await asyncio.sleep(2.0)
    assert len(_events(h, readiness.REASON_NODECLAIM)) == 1
    assert h.obj("apps/v1/deployments", NS, name) is None  # still waiting for the node

    await provision(h, claim)
    await h.wait_for(lambda: _cond(h, name, "ResourceReady").get("status") == "True", what="ResourceReady")
    assert _cond(h, name, "NodeClaimReady")["status"] == "True"
    await h.wait_for(lambda: h.obj("apps/v1/deployments", NS, name), what="Deployment")
    assert h.obj(WS, NS, name)["status"]["workerNodes"] == [f"aks-{claim['metadata']['name']}"]
