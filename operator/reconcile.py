"""One idempotent reconcile pass of a Workspace: validate, observe, apply, report.

Called by the Kopf handlers in `kaito.operator.handlers` (create, update,
resume, timer and child events) with a `KubeAPI`. It renders the desired
children with the pure `kaito.operator.render.render`, creates what is
missing, patches only children whose spec hash changed, and patches the
status only when a condition or workerNodes changed: a pass over a steady
Workspace reads but never writes. Children that are still not ready after the
preset's readiness timeout (`kaito.operator.readiness`) get a False condition
with a timeout reason, written once; later passes still flip it to True.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any

from kaito.operator import (
    admission,
    nodes,
    readiness,
    render,
    render_inference,
    render_tuning,
    schema,
)
from kaito.operator.kube import APIError, KubeAPI
from kaito.operator.settings import OperatorSettings
from kaito.presets import get_preset
from kaito.presets.spec import PresetSpec


@dataclass
class Outcome:
    """What a pass found: done (nothing to wait for), or invalid/waiting with the reason."""

    done: bool = False
    invalid: str | None = None
    waiting: str | None = None
    conditions_changed: bool = False
    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    """Warning Events (reason, message) to post: a readiness timeout, once when first reported."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(type_: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(
    old: list[dict[str, Any]], new: list[dict[str, Any]], generation: int | None
) -> tuple[list[dict[str, Any]], bool]:
    """New conditions keyed by type; lastTransitionTime kept unless the status flips."""
    by_type = {c.get("type"): c for c in old}
    out, changed = [], False
    for c in new:
        c = dict(c)
        if generation is not None:
            c["observedGeneration"] = generation
        prev = by_type.pop(c["type"], None)
        if prev and prev.get("status") == c["status"]:
            c["lastTransitionTime"] = prev.get("lastTransitionTime") or _now()
        else:
            c["lastTransitionTime"] = _now()
        if not prev or any(prev.get(k) != c.get(k) for k in ("status", "reason", "message", "observedGeneration")):
            changed = True
        out.append(c)
    out.extend(by_type.values())  # conditions we do not own this pass (e.g. WorkspaceDeleting)
    return out, changed


def with_workspace_ready(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add WorkspaceReady (what the seed's users wait on) mirroring WorkspaceSucceeded (newer Kaito's name)."""
    out = [c for c in conditions if c["type"] != "WorkspaceReady"]
    for c in conditions:
        if c["type"] == "WorkspaceSucceeded":
            out.append({**c, "type": "WorkspaceReady"})
    return out


async def write_status(
    api: KubeAPI, body: dict[str, Any], conditions: list[dict[str, Any]], worker_nodes: list[str] | None = None
) -> bool:
    conditions = with_workspace_ready(conditions)
    meta = body["metadata"]
    status = body.get("status") or {}
    merged, changed = merge_conditions(status.get("conditions") or [], conditions, meta.get("generation"))
    patch: dict[str, Any] = {}
    if changed:
        patch["conditions"] = merged
    if worker_nodes is not None and worker_nodes != (status.get("workerNodes") or []):
        patch["workerNodes"] = worker_nodes
    if not patch:
        return False
    await api.patch("Workspace", meta.get("namespace"), meta["name"], {"status": patch}, "status")
    return True


async def apply(api: KubeAPI, desired: dict[str, Any], out: Outcome) -> dict[str, Any]:
    """Create the child, or patch it when its spec hash differs; return the live object."""
    meta = desired["metadata"]
    key = f"{desired['kind']}/{meta['name']}"
    live = await api.get(desired["kind"], meta.get("namespace"), meta["name"])
    if desired["kind"] in _TIMED_KINDS:
        # Written with the create or the rollout patch (outside the spec hash): no extra write.
        readiness.mark_started(desired, readiness.utcnow())
    if live is None:
        try:
            live = await api.create(desired)
            out.created.append(key)
            return live
        except APIError as e:
            if e.status != 409:
                raise
            live = await api.get(desired["kind"], meta.get("namespace"), meta["name"]) or {}
    want = meta["annotations"][render.ANN_SPEC_HASH]
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(render.ANN_SPEC_HASH)
    if desired["kind"] == "NodeClaim" or have == want:
        return live  # NodeClaim specs are immutable in Karpenter; never patch them
    patch = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
    live = await api.patch(desired["kind"], meta.get("namespace"), meta["name"], patch)
    out.patched.append(key)
    return live


ANN_PINNED = "kaito.sh/immutable-spec"
_TIMED_KINDS = ("Deployment", "StatefulSet", "NodeClaim")


def _preset_of(ws: schema.Workspace) -> PresetSpec | None:
    spec = ws.inference.preset if ws.inference is not None else (ws.tuning.preset if ws.tuning else None)
    return get_preset(spec.name) if spec is not None else None


def _newly(body: dict[str, Any], ctype: str, reason: str) -> bool:
    """Whether condition `ctype` does not already carry `reason` (so its Event is not posted yet)."""
    for c in (body.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c.get("reason") != reason
    return True


def _immutable(body: dict[str, Any]) -> dict[str, Any]:
    """The fields admission forbids changing, as a minimal Workspace body."""
    res = body.get("resource") or {}
    out: dict[str, Any] = {
        "resource": {k: res[k] for k in ("count", "instanceType", "labelSelector") if k in res},
    }
    for part in ("inference", "tuning"):
        spec = body.get(part)
        if spec is not None:
            kept: dict[str, Any] = {}
            if (spec.get("preset") or {}).get("name"):
                kept["preset"] = {"name": spec["preset"]["name"]}
            if "method" in spec:
                kept["method"] = spec["method"]
            out[part] = kept
    return out


def pinned_spec(body: dict[str, Any]) -> dict[str, Any] | None:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ANN_PINNED)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "resource" in doc else None


async def _user_configmap(api: KubeAPI, ws: schema.Workspace, name: str, key: str) -> str | None:
    cm = await api.get("ConfigMap", ws.namespace, name)
    if cm is None:
        return None
    return (cm.get("data") or {}).get(key, "")


@dataclass(frozen=True)
class _Deadline:
    """How long this pass lets children take to be ready, and for whose sake (in messages)."""

    timeout_s: float
    what: str
    now: datetime.datetime


async def reconcile(
    api: KubeAPI, body: dict[str, Any], settings: OperatorSettings, old: dict[str, Any] | None = None
) -> Outcome:
    """One pass; immutability is checked against the pinned spec (or `old`, Kopf's last handled one)."""
    out = Outcome()
    pinned = pinned_spec(body)
    try:
        ws = admission.validate(body, pinned or old, settings.max_replicas)
        out.waiting = await _missing_config(api, ws)
    except admission.WorkspaceInvalid as e:
        return await _report_invalid(api, body, out, str(e))
    if pinned is None:
        await _pin_immutable(api, body)
    observed = nodes.matching_nodes(ws, await api.list("Node", None, ws.resource.label_selector.match_labels or None))
    desired = render.render(ws, settings, observed)
    for claim in (o for o in desired if o["kind"] == "NodeClaim"):
        await apply(api, claim, out)
    deadline = _deadline(ws, settings)
    conds: list[dict[str, Any]] = []
    claims_late = ""
    if not settings.bring_your_own_nodes:
        claims_late = await _nodeclaim_condition(api, body, ws, deadline, conds, out)
    workers = [n["metadata"]["name"] for n in observed][: ws.resource.count]
    if not _resource_condition(ws, len(observed), claims_late, conds) or out.waiting:
        _waiting_conditions(ws, len(observed), conds, out)
        out.conditions_changed = await write_status(api, body, conds, workers)
        return out
    live: dict[str, dict[str, Any]] = {}
    for obj in desired:
        if obj["kind"] != "NodeClaim":
            live[obj["kind"]] = await apply(api, obj, out)
    if ws.inference is not None:
        _inference_conditions(body, ws, live, deadline, conds, out)
    else:
        _tuning_conditions(ws, live, conds, out)
    out.conditions_changed = await write_status(api, body, conds, workers)
    return out


async def _missing_config(api: KubeAPI, ws: schema.Workspace) -> str | None:
    """What the pass waits for when a named ConfigMap is missing; raises WorkspaceInvalid on a bad one."""
    if ws.tuning is not None and ws.tuning.config:
        text = await _user_configmap(api, ws, ws.tuning.config, render_tuning.CONFIG_KEY)
        if text is None:
            return f"tuning.config: ConfigMap {ws.tuning.config!r} not found in {ws.namespace}"
        errs = admission.check_training_config(ws.tuning.method, text)
        if errs:
            raise admission.WorkspaceInvalid(errs)
    if ws.inference is not None and ws.inference.config:
        if await api.get("ConfigMap", ws.namespace, ws.inference.config) is None:
            return f"inference.config: ConfigMap {ws.inference.config!r} not found in {ws.namespace}"
    return None


async def _report_invalid(api: KubeAPI, body: dict[str, Any], out: Outcome, message: str) -> Outcome:
    out.invalid = message
    conds = [_cond("WorkspaceSucceeded", False, "InvalidWorkspace", message)]
    if body.get("inference") is not None:
        conds.append(_cond("InferenceReady", False, "InvalidWorkspace", message))
    out.conditions_changed = await write_status(api, body, conds)
    return out


async def _pin_immutable(api: KubeAPI, body: dict[str, Any]) -> None:
    # Pin the immutable fields once, so every later pass (timers, child events), not only
    # Kopf's update handler, can refuse a change. Kopf ignores kaito.sh/ annotations.
    meta = body["metadata"]
    patch = {"metadata": {"annotations": {ANN_PINNED: json.dumps(_immutable(body), sort_keys=True)}}}
    await api.patch("Workspace", meta.get("namespace"), meta["name"], patch)


def _deadline(ws: schema.Workspace, settings: OperatorSettings) -> _Deadline:
    preset = _preset_of(ws)
    what = f"preset {preset.name}" if preset is not None else "the workspace"
    return _Deadline(readiness.timeout_for(preset, settings), what, readiness.utcnow())


async def _nodeclaim_condition(
    api: KubeAPI,
    body: dict[str, Any],
    ws: schema.Workspace,
    deadline: _Deadline,
    conds: list[dict[str, Any]],
    out: Outcome,
) -> str:
    """Append NodeClaimReady; return the timeout message when some claims are late ("" otherwise)."""
    live_claims = await api.list("NodeClaim", None, render.child_labels(ws))
    pending = [c for c in live_claims if not nodes.is_ready(c)]
    late = sorted(
        c["metadata"]["name"]
        for c in pending
        if readiness.timed_out(readiness.started_at(c), deadline.timeout_s, deadline.now)
    )
    if late:
        message = (
            f"NodeClaims {', '.join(late)} not Ready after {readiness.seconds_text(deadline.timeout_s)} "
            f"(readiness timeout of {deadline.what})"
        )
        conds.append(_cond("NodeClaimReady", False, readiness.REASON_NODECLAIM, message))
        if _newly(body, "NodeClaimReady", readiness.REASON_NODECLAIM):
            out.events.append((readiness.REASON_NODECLAIM, message))
        return message
    if pending:
        waiting = ", ".join(sorted(c["metadata"]["name"] for c in pending))
        conds.append(_cond("NodeClaimReady", False, "NodeClaimNotReady", f"waiting for NodeClaims {waiting}"))
    else:
        conds.append(_cond("NodeClaimReady", True, "NodeClaimsReady", f"{len(live_claims)} NodeClaim(s) ready"))
    return ""


def _resource_condition(ws: schema.Workspace, ready: int, claims_late: str, conds: list[dict[str, Any]]) -> bool:
    """Append ResourceReady; True when enough matching nodes are Ready."""
    count = ws.resource.count
    msg = f"{ready} of {count} node(s) ready"
    if ready >= count:
        conds.append(_cond("ResourceReady", True, "NodesReady", msg))
        return True
    if claims_late:
        conds.append(_cond("ResourceReady", False, readiness.REASON_NODECLAIM, f"{msg}; {claims_late}"))
    else:
        conds.append(_cond("ResourceReady", False, "NodesNotReady", msg))
    return False


def _waiting_conditions(ws: schema.Workspace, ready: int, conds: list[dict[str, Any]], out: Outcome) -> None:
    """Before the workload is applied: say what the pass waits for (a ConfigMap, or the nodes)."""
    out.waiting = out.waiting or f"waiting for GPU nodes: {ready} of {ws.resource.count} node(s) ready"
    waiting_type = "InferenceReady" if ws.inference is not None else "JobStarted"
    conds.append(_cond(waiting_type, False, "Pending", out.waiting))
    conds.append(_cond("WorkspaceSucceeded", False, "Pending", out.waiting))


def _inference_conditions(
    body: dict[str, Any],
    ws: schema.Workspace,
    live: dict[str, dict[str, Any]],
    deadline: _Deadline,
    conds: list[dict[str, Any]],
    out: Outcome,
) -> None:
    workload = live.get("StatefulSet") or live.get("Deployment")
    count = ws.resource.count
    ready = render_inference.workload_ready(workload, count)
    if ready:
        msg = "inference pods are ready"
        conds.append(_cond("InferenceReady", True, "InferenceReady", msg))
        conds.append(_cond("WorkspaceSucceeded", True, "WorkspaceReady", msg))
    elif readiness.timed_out(readiness.started_at(workload), deadline.timeout_s, deadline.now):
        # Still reconciled after this (the handler keeps retrying, the timer and pod
        # events re-check), so pods that become ready later flip the conditions to True.
        have = int(((workload or {}).get("status") or {}).get("readyReplicas") or 0)
        msg = (
            f"{(workload or {}).get('kind', 'workload')} {ws.name}: {have}/{count} replicas ready after "
            f"{readiness.seconds_text(deadline.timeout_s)} (readiness timeout of {deadline.what})"
        )
        conds.append(_cond("InferenceReady", False, readiness.REASON_INFERENCE, msg))
        conds.append(_cond("WorkspaceSucceeded", False, readiness.REASON_INFERENCE, msg))
        if _newly(body, "InferenceReady", readiness.REASON_INFERENCE):
            out.events.append((readiness.REASON_INFERENCE, msg))
    else:
        msg = "waiting for the inference pods to be ready"
        conds.append(_cond("InferenceReady", False, "InferencePending", msg))
        conds.append(_cond("WorkspaceSucceeded", False, "Pending", msg))
    out.done = ready
    if not ready:
        out.waiting = msg


def _tuning_conditions(
    ws: schema.Workspace, live: dict[str, dict[str, Any]], conds: list[dict[str, Any]], out: Outcome
) -> None:
    conds.append(_cond("JobStarted", True, "JobCreated", f"tuning Job {ws.name} created"))
    state, msg = render_tuning.job_state(live.get("Job"))
    reason = {True: "TuningSucceeded", False: "TuningFailed", None: "TuningRunning"}[state]
    conds.append(_cond("WorkspaceSucceeded", bool(state), reason, msg))
    out.done = state is not None
    if state is None:
        out.waiting = msg


async def finalize(api: KubeAPI, body: dict[str, Any]) -> int:
    """On deletion: mark WorkspaceDeleting and delete this workspace's NodeClaims; returns how many."""
    meta = body["metadata"]
    labels = {schema.LABEL_WORKSPACE: meta["name"], schema.LABEL_WORKSPACE_NS: meta.get("namespace") or "default"}
    claims = await api.list("NodeClaim", None, labels)
    for claim in claims:
        await api.delete("NodeClaim", None, claim["metadata"]["name"])
    return len(claims)


async def post_event(api: KubeAPI, body: dict[str, Any], reason: str, message: str) -> None:
    """A Warning Event on the workspace (`kubectl describe workspace` shows it)."""
    meta = body["metadata"]
    now = _now()
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta.get("namespace") or "default"},
            "involvedObject": {
                "apiVersion": body.get("apiVersion") or f"{schema.GROUP}/{schema.STORAGE_VERSION}",
                "kind": schema.KIND,
                "name": meta["name"],
                "namespace": meta.get("namespace") or "default",
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": "kaito-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
    )
