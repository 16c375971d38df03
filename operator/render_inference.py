"""Renders an inference Workspace: ConfigMap, Service, Deployment or StatefulSet + headless Service.

Called by `kaito.operator.render.render`; `is_distributed` and
`ADAPTER_INIT_PREFIX` also by `kaito.operator.admission`, `workload_ready` by
`kaito.operator.reconcile`. The pod runs the runtime by its
command (`python -m kaito.runtime ...`, torchrun across nodes), adapters are
pulled by one init container each (`kaito image pull`), and GET /health on
port 5000 is the probe.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from kaito.operator import render as r
from kaito.operator import schema
from kaito.operator.settings import OperatorSettings
from kaito.presets import contract
from kaito.presets.spec import PresetSpec

PORT = contract.RUNTIME_PORT
MASTER_PORT = contract.TORCHRUN_PORT
CONFIG_KEY = contract.INFERENCE_CONFIG_FILE
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
ADAPTER_INIT_PREFIX = "adapter-"  # init container adapter-<name>: a DNS-1123 label, so names stay <= 55


def default_config_text() -> str:
    return resources.files("kaito.operator").joinpath("configs/inference.yaml").read_text()


def config_map_name(ws: schema.Workspace) -> str:
    assert ws.inference is not None
    return ws.inference.config or f"{ws.name}-inference-config"


def is_distributed(ws: schema.Workspace, preset: PresetSpec | None) -> bool:
    return preset is not None and ws.resource.count > 1 and preset.supports_distributed_inference


def runtime_args(spec: schema.PresetSpec, preset: PresetSpec) -> list[str]:
    """Arguments of `python -m kaito.runtime` (after `python` or `torchrun ...`)."""
    return [
        "-m", "kaito.runtime",
        "--preset", preset.name,
        "--model-dir", r.model_dir(spec, preset),
        "--adapters-dir", contract.ADAPTERS_DIR,
        "--port", str(PORT),
        "--config", contract.config_path(CONFIG_KEY),
    ]


def _adapter_parts(
    ws: schema.Workspace, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(init containers, env vars, extra volumes) for the adapters."""
    assert ws.inference is not None
    inits, env, volumes = [], [], []
    for adapter in ws.inference.adapters or []:
        name = adapter.source.name or ""
        mounts: list[dict[str, Any]] = [{"name": "adapter", "mountPath": contract.ADAPTERS_DIR}]
        secrets = adapter.source.image_pull_secrets or []
        container: dict[str, Any] = {
            "name": f"{ADAPTER_INIT_PREFIX}{name}",  # admission keeps names short enough
            "image": settings.puller,
            "command": ["kaito", "image", "pull", adapter.source.image or "", f"{contract.ADAPTERS_DIR}/{name}"],
            "volumeMounts": mounts,
        }
        if secrets:
            # `kaito image pull` reads registry credentials from $DOCKER_CONFIG/config.json.
            vol = f"pull-{name}"[:63]
            volumes.append(
                {
                    "name": vol,
                    "secret": {
                        "secretName": secrets[0],
                        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                    },
                }
            )
            mounts.append({"name": vol, "mountPath": contract.DOCKER_CONFIG_DIR, "readOnly": True})
            container["env"] = [{"name": contract.ENV_DOCKER_CONFIG, "value": contract.DOCKER_CONFIG_DIR}]
        inits.append(container)
        env.append({"name": name, "value": adapter.strength if adapter.strength is not None else "1.0"})
    return inits, env, volumes


def _launch(
    ws: schema.Workspace, spec: schema.PresetSpec, preset: PresetSpec, gpus: int, sts_name: str | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """(command, extra env) of the runtime container: torchrun across the StatefulSet's pods, or python."""
    if sts_name is None:
        return ["python", *runtime_args(spec, preset)], []
    command = [
        "torchrun",
        "--nnodes", str(ws.resource.count),
        "--nproc-per-node", str(gpus),
        "--node-rank", "$(POD_INDEX)",
        "--master-addr", f"{sts_name}-0.{sts_name}-headless",
        "--master-port", str(MASTER_PORT),
        *runtime_args(spec, preset),
    ]  # fmt: skip
    env = [{"name": "POD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}}]
    return command, env


def _pod_template(
    ws: schema.Workspace, settings: OperatorSettings, preset: PresetSpec, distributed: bool, sts_name: str
) -> dict[str, Any]:
    assert ws.inference is not None and ws.inference.preset is not None
    spec = ws.inference.preset
    gpus = r.gpus_per_node(ws, preset)
    adapter_inits, adapter_env, adapter_vols = _adapter_parts(ws, settings)
    w_inits, w_vols, w_mounts = r.weights_init(spec, preset, settings)
    shm_vol, shm_mount = r.shm_volume()
    command, extra_env = _launch(ws, spec, preset, gpus, sts_name if distributed else None)
    probe = {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10}
    container: dict[str, Any] = {
        "name": ws.name[:63],
        "image": r.preset_image(spec, preset, settings),
        "command": command,
        "env": extra_env + adapter_env,
        "ports": [{"name": "http", "containerPort": PORT}]
        + ([{"name": "rendezvous", "containerPort": MASTER_PORT}] if distributed else []),
        "resources": r.gpu_resources(gpus),
        "readinessProbe": {**probe, "initialDelaySeconds": 10},
        "livenessProbe": {**probe, "initialDelaySeconds": 600, "failureThreshold": 3},
        "volumeMounts": [
            shm_mount,
            {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": "adapter", "mountPath": contract.ADAPTERS_DIR},
            *w_mounts,
        ],
    }
    pull_secrets = list(spec.preset_options.image_pull_secrets or []) if spec.preset_options else []
    for adapter in ws.inference.adapters or []:
        pull_secrets += adapter.source.image_pull_secrets or []
    pod_spec: dict[str, Any] = {
        "affinity": r.affinity(ws),
        "tolerations": [dict(t) for t in r.TOLERATIONS],
        "initContainers": w_inits + adapter_inits,
        "containers": [container],
        "volumes": [
            shm_vol,
            {"name": "config", "configMap": {"name": config_map_name(ws)}},
            {"name": "adapter", "emptyDir": {}},
            *w_vols,
            *adapter_vols,
        ],
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in dict.fromkeys(pull_secrets)]
    adapters = [a.model_dump(by_alias=True, exclude_none=True) for a in ws.inference.adapters or []]
    digest = hashlib.sha256(json.dumps(adapters, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "metadata": {"labels": r.child_labels(ws), "annotations": {"kaito.sh/adapters-hash": digest}},
        "spec": pod_spec,
    }


def _template_workload(ws: schema.Workspace) -> dict[str, Any]:
    """A Deployment around the user's raw pod template (inference.template)."""
    assert ws.inference is not None and ws.inference.template is not None
    template = json.loads(json.dumps(ws.inference.template))
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **r.child_labels(ws)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": r.child_meta(ws, ws.name),
        "spec": {
            "replicas": ws.resource.count,
            "selector": {"matchLabels": r.child_labels(ws)},
            "template": template,
        },
    }


def _service(ws: schema.Workspace, distributed: bool) -> dict[str, Any]:
    lb = ws.annotations.get(schema.ANN_ENABLE_LB, "").lower() == "true"
    selector = dict(r.child_labels(ws))
    if distributed:
        selector[POD_INDEX_LABEL] = "0"  # only rank 0 serves HTTP
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": r.child_meta(ws, ws.name),
        "spec": {
            "type": "LoadBalancer" if lb else "ClusterIP",
            "selector": selector,
            # The seed's `kubectl get svc` shows 80/TCP,29500/TCP even for one node: Kaito always
            # lists the torchrun rendezvous port, so tools matching on it keep working.
            "ports": [
                {"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"},
                {"name": "torchrun", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"},
            ],
        },
    }


def _workloads(ws: schema.Workspace, template: dict[str, Any], distributed: bool) -> list[dict[str, Any]]:
    """A StatefulSet and its headless Service (torchrun across nodes), or a Deployment of replicas."""
    objs: list[dict[str, Any]] = []
    selector = {"matchLabels": r.child_labels(ws)}
    if distributed:
        headless = f"{ws.name}-headless"
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": r.child_meta(ws, headless),
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,
                    "selector": r.child_labels(ws),
                    "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
                },
            }
        )
        objs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": r.child_meta(ws, ws.name),
                "spec": {
                    "replicas": ws.resource.count,
                    "serviceName": headless,
                    "podManagementPolicy": "Parallel",
                    "selector": selector,
                    "template": template,
                },
            }
        )
    else:
        objs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": r.child_meta(ws, ws.name),
                "spec": {
                    "replicas": ws.resource.count,
                    # GPU nodes are sized to the workload: no room for a surge pod.
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                    "selector": selector,
                    "template": template,
                },
            }
        )
    return objs


def render_inference(
    ws: schema.Workspace, settings: OperatorSettings, preset: PresetSpec | None
) -> list[dict[str, Any]]:
    assert ws.inference is not None
    objs: list[dict[str, Any]] = []
    if ws.inference.template is not None:
        return [_service(ws, False), _template_workload(ws)]
    assert preset is not None
    if not ws.inference.config:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": r.child_meta(ws, config_map_name(ws)),
                "data": {CONFIG_KEY: default_config_text()},
            }
        )
    distributed = is_distributed(ws, preset)
    objs.append(_service(ws, distributed))
    objs += _workloads(ws, _pod_template(ws, settings, preset, distributed, ws.name), distributed)
    return objs


def workload_ready(obj: dict[str, Any] | None, replicas: int) -> bool:
    if not obj:
        return False
    status = obj.get("status") or {}
    return int(status.get("readyReplicas") or 0) >= replicas
