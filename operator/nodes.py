"""GPU nodes of a Workspace: which observed nodes count, and the Karpenter NodeClaims still needed.

Called by `kaito.operator.render` (NodeClaims), `kaito.operator.reconcile`
(matching nodes, readiness) and `kaito operator render` (the node label of the
Ready nodes it pretends to observe). Pure functions over plain Node / NodeClaim dicts.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kaito.operator import schema
from kaito.operator.settings import OperatorSettings
from kaito.presets.spec import PresetSpec

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
NODECLAIM_API = "karpenter.sh/v1"
NODEPOOL_LABEL = "karpenter.sh/nodepool"
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def selector_matches(sel: schema.LabelSelector, labels: dict[str, str]) -> bool:
    for k, v in (sel.match_labels or {}).items():
        if labels.get(k) != v:
            return False
    for req in sel.match_expressions or []:
        present = req.key in labels
        values = req.values or []
        if req.operator == "In" and not (present and labels[req.key] in values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def is_ready(obj: dict[str, Any]) -> bool:
    """True when the object's `Ready` condition is "True": a Node or a Karpenter NodeClaim."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def matching_nodes(ws: schema.Workspace, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ready nodes matching the selector and either preferredNodes or the instance type, by name."""
    preferred = set(ws.resource.preferred_nodes or [])
    out = []
    for node in nodes:
        labels = _labels(node)
        name = node["metadata"]["name"]
        if not is_ready(node) or not selector_matches(ws.resource.label_selector, labels):
            continue
        owned = labels.get(schema.LABEL_WORKSPACE) == ws.name
        if name in preferred or owned or labels.get(INSTANCE_TYPE_LABEL, "").lower() == ws.resource.instance_type.lower():
            out.append(node)
    return sorted(out, key=lambda n: n["metadata"]["name"])


def nodeclaim_name(ws: schema.Workspace, index: int) -> str:
    """Stable per workspace and index, so re-rendering never asks for a second claim."""
    digest = hashlib.sha256(f"{ws.namespace}/{ws.name}".encode()).hexdigest()[:8]
    return f"ws{digest}-{index}"


def render_nodeclaims(
    ws: schema.Workspace,
    settings: OperatorSettings,
    nodes: list[dict[str, Any]],
    preset: PresetSpec | None,
) -> list[dict[str, Any]]:
    """NodeClaims for the nodes still missing: count minus matching nodes we did not provision."""
    matched = matching_nodes(ws, nodes)
    foreign = [n for n in matched if _labels(n).get(schema.LABEL_WORKSPACE) != ws.name]
    needed = max(0, ws.resource.count - len(foreign))
    labels = {
        schema.LABEL_WORKSPACE: ws.name,
        schema.LABEL_WORKSPACE_NS: ws.namespace,
        NODEPOOL_LABEL: settings.node_pool,
        **(ws.resource.label_selector.match_labels or {}),
    }
    disk = preset.disk if preset is not None else 100
    claims = []
    for i in range(needed):
        claims.append(
            {
                "apiVersion": NODECLAIM_API,
                "kind": "NodeClaim",
                "metadata": {
                    "name": nodeclaim_name(ws, i),
                    "labels": dict(labels),
                    "annotations": {DO_NOT_DISRUPT: "true"},
                },
                "spec": {
                    "nodeClassRef": {
                        "group": settings.node_class_group,
                        "kind": settings.node_class_kind,
                        "name": settings.node_class_name,
                    },
                    "requirements": [
                        {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [ws.resource.instance_type]},
                        {"key": NODEPOOL_LABEL, "operator": "In", "values": [settings.node_pool]},
                        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                    ],
                    "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
                    "resources": {"requests": {"storage": f"{disk}Gi"}},
                },
            }
        )
    return claims
