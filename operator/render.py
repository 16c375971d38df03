"""Rendering entry point: (Workspace, settings, observed nodes) -> desired objects.

A pure function called by the reconciler (`kaito.operator.reconcile`), by
`kaito operator render FILE` and by the unit tests. It never talks to the API.
Shared pieces of the pod specs (labels, owner references, node affinity,
tolerations, GPU requests) live here; inference and tuning specifics live in
`kaito.operator.render_inference` and `kaito.operator.render_tuning`, node
claims in `kaito.operator.nodes`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kaito.operator import schema
from kaito.operator.settings import OperatorSettings
from kaito.presets import InvalidInput, contract, get_preset, get_sku
from kaito.presets.spec import PresetSpec

ANN_SPEC_HASH = "kaito.sh/spec-hash"


def child_labels(ws: schema.Workspace) -> dict[str, str]:
    return {schema.LABEL_WORKSPACE: ws.name, schema.LABEL_WORKSPACE_NS: ws.namespace}


def owner_reference(ws: schema.Workspace) -> dict[str, Any]:
    return {
        "apiVersion": ws.api_version or f"{schema.GROUP}/{schema.STORAGE_VERSION}",
        "kind": schema.KIND,
        "name": ws.name,
        "uid": ws.metadata.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_meta(ws: schema.Workspace, name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": child_labels(ws)}
    if namespaced:
        meta["namespace"] = ws.namespace
        # Cluster-scoped children (NodeClaims) cannot be owned by a namespaced
        # object; the finalizer deletes them instead.
        meta["ownerReferences"] = [owner_reference(ws)]
    return meta


def spec_hash(obj: dict[str, Any]) -> str:
    """Hash of what we render; the reconciler patches a child only when it changes."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    obj.setdefault("metadata", {}).setdefault("annotations", {})[ANN_SPEC_HASH] = spec_hash(obj)
    return obj


def node_selector_terms(ws: schema.Workspace) -> list[dict[str, Any]]:
    sel = ws.resource.label_selector
    exprs: list[dict[str, Any]] = [
        {"key": k, "operator": "In", "values": [v]} for k, v in sorted((sel.match_labels or {}).items())
    ]
    for req in sel.match_expressions or []:
        e: dict[str, Any] = {"key": req.key, "operator": req.operator}
        if req.values:
            e["values"] = list(req.values)
        exprs.append(e)
    return [{"matchExpressions": exprs}]


def affinity(ws: schema.Workspace) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": node_selector_terms(ws)}
        }
    }


TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
]


def gpus_per_node(ws: schema.Workspace, preset: PresetSpec | None) -> int:
    """GPUs each pod requests: the SKU's count; the preset's need when the SKU is unknown (bypass)."""
    try:
        return get_sku(ws.resource.instance_type).gpus
    except InvalidInput:
        if preset is None:
            return 1
        return max(1, -(-preset.gpu.gpu_count // ws.resource.count))


def gpu_resources(gpus: int) -> dict[str, Any]:
    return {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}


def shm_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "dshm", "mountPath": "/dev/shm"},
    )


def downloads_weights(spec: schema.PresetSpec, preset: PresetSpec) -> bool:
    """Whether the pod downloads the weights at start (gated presets; a private image brings its own)."""
    return preset.download_at_runtime and spec.access_mode != "private"


def model_dir(spec: schema.PresetSpec, preset: PresetSpec) -> str:
    return contract.DOWNLOADED_WEIGHTS_DIR if downloads_weights(spec, preset) else contract.WEIGHTS_DIR


def preset_image(spec: schema.PresetSpec, preset: PresetSpec, settings: OperatorSettings) -> str:
    if spec.access_mode == "private" and spec.preset_options and spec.preset_options.image:
        return spec.preset_options.image
    if settings.weights_from_modelpack or downloads_weights(spec, preset):
        return settings.base_image
    return preset.image_ref(settings.registry)


def weights_ref(preset: PresetSpec, settings: OperatorSettings) -> str:
    """The ModelPack weights artifact: `<registry>/kaito-<preset>-weights:<image_tag>` (the builder's name)."""
    from kaito.presets.images import modelpack_image

    return modelpack_image(settings.registry, preset.name, preset.image_tag)


def weights_init(
    spec: schema.PresetSpec, preset: PresetSpec, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(init containers, volumes, main-container mounts) for downloads and ModelPack mode; empty otherwise."""
    if downloads_weights(spec, preset):
        return _hub_download_init(spec, preset, settings)
    if not settings.weights_from_modelpack or spec.access_mode == "private":
        return [], [], []
    mount = {"name": "weights", "mountPath": contract.WEIGHTS_DIR}
    init = {
        "name": "weights",
        "image": settings.puller,
        "command": ["kaito", "image", "pull", weights_ref(preset, settings), contract.WEIGHTS_DIR],
        "volumeMounts": [mount],
    }
    return [init], [{"name": "weights", "emptyDir": {}}], [mount]


def _hub_download_init(
    spec: schema.PresetSpec, preset: PresetSpec, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """An init container downloading the preset at its pinned revision with the user's token.

    The cache sits on the pod's weights volume, so an init container killed half way
    resumes (Range requests) when the kubelet runs it again; `--force` relinks a
    finished download instead of refusing the existing directory.
    """
    secret = spec.preset_options.model_access_secret if spec.preset_options else None
    mount = {"name": "weights", "mountPath": contract.WEIGHTS_DIR}
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_HUB_CACHE, "value": contract.HUB_CACHE_DIR},
        {"name": "HF_HUB_OFFLINE", "value": "0"},  # the image may default to offline
    ]
    if secret:
        key_ref = {"name": secret, "key": contract.ENV_HF_TOKEN}  # Kaito's Secret key is the variable's name
        env.append({"name": contract.ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": key_ref}})
    if settings.hub_endpoint:
        env.append({"name": contract.ENV_HF_ENDPOINT, "value": settings.hub_endpoint})
    init = {
        "name": "model-downloader",
        "image": settings.puller,
        "command": ["kaito", "presets", "weights", preset.name, model_dir(spec, preset), "--force"],
        "env": env,
        "volumeMounts": [mount],
    }
    return [init], [{"name": "weights", "emptyDir": {}}], [dict(mount)]


def render(
    workspace: dict[str, Any] | schema.Workspace,
    settings: OperatorSettings,
    nodes: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """All desired children of a Workspace, each stamped with its spec hash.

    `nodes` are the observed Ready nodes matching the selector; they decide
    how many NodeClaims are still needed.
    """
    from kaito.operator import nodes as node_mod
    from kaito.operator import render_inference, render_tuning

    ws = workspace if isinstance(workspace, schema.Workspace) else schema.Workspace.model_validate(workspace)
    objs: list[dict[str, Any]] = []
    preset = None
    if ws.inference is not None and ws.inference.preset is not None:
        preset = get_preset(ws.inference.preset.name)
    elif ws.tuning is not None:
        preset = get_preset(ws.tuning.preset.name)
    if not settings.bring_your_own_nodes:
        objs += node_mod.render_nodeclaims(ws, settings, nodes, preset)
    if ws.inference is not None:
        objs += render_inference.render_inference(ws, settings, preset)
    elif ws.tuning is not None:
        assert preset is not None
        objs += render_tuning.render_tuning(ws, settings, preset)
    return [stamp(o) for o in objs]
