"""Renders a tuning Workspace: the default training-config ConfigMap and the batch Job.

`render_tuning` is called by `kaito.operator.render.render`; `job_state` and
`CONFIG_KEY` by `kaito.operator.reconcile` (the Job's outcome, and the key
read from a user's ConfigMap). The ConfigMap is rendered only when the
Workspace names none; its text is Kaito's default for the method, from
`kaito.presets.training_configs`, the one copy the tuning job parses too.
Init containers download the weights for download-at-start presets
(`render.weights_init`) and fetch the data into /mnt/data (`kaito tune
fetch-data` for URLs, `kaito image pull` for an image; a volume is mounted
instead); the trainer runs `python -m kaito.tuning` and pushes the adapter
with the imagePushSecret mounted as docker config.
"""

from __future__ import annotations

from typing import Any

from kaito.operator import render as r
from kaito.operator import schema
from kaito.operator.settings import OperatorSettings
from kaito.presets import contract
from kaito.presets.spec import PresetSpec
from kaito.presets.training_configs import default_training_config

CONFIG_KEY = contract.TRAINING_CONFIG_FILE


def config_map_name(ws: schema.Workspace) -> str:
    assert ws.tuning is not None
    return ws.tuning.config or f"{ws.name}-tuning-config"


def _docker_secret_volume(vol: str, secret: str) -> dict[str, Any]:
    return {
        "name": vol,
        "secret": {"secretName": secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]},
    }


def _data_init(
    ws: schema.Workspace, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(init containers, volumes) that put the training data at /mnt/data."""
    assert ws.tuning is not None
    src = ws.tuning.input
    mount = {"name": "data", "mountPath": contract.DATA_DIR}
    if src.volume_source:
        return [], [{"name": "data", **src.volume_source}]
    volumes: list[dict[str, Any]] = [{"name": "data", "emptyDir": {}}]
    if src.urls:
        command = ["kaito", "tune", "fetch-data", "--dest", contract.DATA_DIR, *src.urls]
        return [{"name": "data-downloader", "image": settings.puller, "command": command, "volumeMounts": [mount]}], volumes
    init: dict[str, Any] = {
        "name": "data-puller",
        "image": settings.puller,
        "command": ["kaito", "image", "pull", src.image or "", contract.DATA_DIR],
        "volumeMounts": [mount],
    }
    if src.image_pull_secrets:
        volumes.append(_docker_secret_volume("data-pull-secret", src.image_pull_secrets[0]))
        init["volumeMounts"] = [mount, {"name": "data-pull-secret", "mountPath": contract.DOCKER_CONFIG_DIR, "readOnly": True}]
        init["env"] = [{"name": contract.ENV_DOCKER_CONFIG, "value": contract.DOCKER_CONFIG_DIR}]
    return [init], volumes


def _trainer_command(ws: schema.Workspace, preset: PresetSpec) -> list[str]:
    assert ws.tuning is not None
    cmd = [
        "python", "-m", "kaito.tuning",
        "--config", contract.config_path(CONFIG_KEY),
        "--preset", preset.name,
        "--method", ws.tuning.method,
        "--data", contract.DATA_DIR,
        "--output", contract.RESULTS_DIR,
    ]
    if r.downloads_weights(ws.tuning.preset, preset):  # weights are not at the image's default place
        cmd += ["--model-dir", r.model_dir(ws.tuning.preset, preset)]
    if ws.tuning.output.image:
        cmd += ["--push", ws.tuning.output.image, "--push-secret", f"{contract.DOCKER_CONFIG_DIR}/config.json"]
    return cmd


def _job_storage(
    ws: schema.Workspace, settings: OperatorSettings, preset: PresetSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(init containers, volumes, trainer mounts): weights, data, config, results and the push secret."""
    tuning = ws.tuning
    assert tuning is not None
    data_inits, data_vols = _data_init(ws, settings)
    w_inits, w_vols, w_mounts = r.weights_init(tuning.preset, preset, settings)
    shm_vol, shm_mount = r.shm_volume()
    mounts: list[dict[str, Any]] = [
        shm_mount,
        {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": "data", "mountPath": contract.DATA_DIR},
        {"name": "results", "mountPath": contract.RESULTS_DIR},
        *w_mounts,
    ]
    volumes: list[dict[str, Any]] = [
        shm_vol,
        {"name": "config", "configMap": {"name": config_map_name(ws)}},
        *data_vols,
        *w_vols,
    ]
    out = tuning.output
    if out.volume_source:
        volumes.append({"name": "results", **out.volume_source})
    else:
        volumes.append({"name": "results", "emptyDir": {}})
    if out.image and out.image_push_secret:
        volumes.append(_docker_secret_volume("push-secret", out.image_push_secret))
        mounts.append({"name": "push-secret", "mountPath": contract.DOCKER_CONFIG_DIR, "readOnly": True})
    return w_inits + data_inits, volumes, mounts


def render_tuning(ws: schema.Workspace, settings: OperatorSettings, preset: PresetSpec) -> list[dict[str, Any]]:
    tuning = ws.tuning
    assert tuning is not None
    objs: list[dict[str, Any]] = []
    if not tuning.config:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": r.child_meta(ws, config_map_name(ws)),
                "data": {CONFIG_KEY: default_training_config(tuning.method)},
            }
        )
    inits, volumes, mounts = _job_storage(ws, settings, preset)
    trainer = {
        "name": "trainer",
        "image": r.preset_image(tuning.preset, preset, settings),
        "command": _trainer_command(ws, preset),
        "resources": r.gpu_resources(r.gpus_per_node(ws, preset)),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "affinity": r.affinity(ws),
        "tolerations": [dict(t) for t in r.TOLERATIONS],
        "initContainers": inits,
        "containers": [trainer],
        "volumes": volumes,
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    secrets: list[str] = []
    if tuning.preset.preset_options:
        secrets += tuning.preset.preset_options.image_pull_secrets or []
    if secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in secrets]
    objs.append(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": r.child_meta(ws, ws.name),
            "spec": {
                "backoffLimit": 0,
                "template": {"metadata": {"labels": r.child_labels(ws)}, "spec": pod_spec},
            },
        }
    )
    return objs


def job_state(job: dict[str, Any] | None) -> tuple[bool | None, str]:
    """(True: succeeded, False: failed, None: running or absent; message)."""
    if not job:
        return None, "the tuning Job does not exist yet"
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return True, "the tuning Job succeeded"
        if cond.get("type") == "Failed":
            return False, f"the tuning Job failed: {cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": ")
    if int(status.get("succeeded") or 0) >= 1:
        return True, "the tuning Job succeeded"
    return None, "the tuning Job is running"
