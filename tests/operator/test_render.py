"""render(workspace, settings, nodes) -> objects: pure, complete, and valid against Kubernetes' schemas."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kaito.operator import render, render_tuning
from kaito.operator.settings import OperatorSettings
from op_harness import example_files, load_example

# Pinned: the schemas kubernetes-validate bundles for Kubernetes 1.30 (StatefulSet pod-index label is GA there).
K8S_VERSION = "1.30.0"
NODECLAIM_SCHEMA = yaml.safe_load((Path(__file__).parent / "data/karpenter.sh_nodeclaims.v1.schema.yaml").read_text())
SETTINGS = OperatorSettings()


def _ws(name: str, **meta: Any) -> dict[str, Any]:
    body = load_example(name)
    body["metadata"].update({"namespace": "team-a", "uid": "1234-abcd", **meta})
    return body


def _node(name: str, labels: dict[str, str], ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def _by_kind(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def _validate_all(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        if obj["kind"] == "NodeClaim":
            jsonschema.validate(obj, NODECLAIM_SCHEMA)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return _by_kind(objs)[kind][0]["spec"]["template"]["spec"]


def test_pinned_kubernetes_version_is_bundled() -> None:
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


EXPECTED = {
    "workspace-phi-3-mini.yaml": ["NodeClaim", "ConfigMap", "Service", "Deployment"],
    "workspace-phi-3-mini-adapter.yaml": ["NodeClaim", "ConfigMap", "Service", "Deployment"],
    "workspace-tuning-phi-3.yaml": ["NodeClaim", "ConfigMap", "Job"],
}


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_seed_examples_render_valid_children(path: Path) -> None:
    body = _ws(path.name)
    objs = render.render(body, SETTINGS, [])
    assert [o["kind"] for o in objs] == EXPECTED[path.name]
    _validate_all(objs)
    for obj in objs:
        meta = obj["metadata"]
        assert meta["labels"]["kaito.sh/workspace"] == body["metadata"]["name"]
        assert meta["labels"]["kaito.sh/workspacenamespace"] == "team-a"
        assert meta["annotations"][render.ANN_SPEC_HASH]
        if obj["kind"] != "NodeClaim":
            assert meta["namespace"] == "team-a"
            assert meta["ownerReferences"][0]["uid"] == "1234-abcd"
            assert meta["ownerReferences"][0]["kind"] == "Workspace"
    # Pure: same inputs, same objects; the input is not mutated.
    before = copy.deepcopy(body)
    assert render.render(body, SETTINGS, []) == objs
    assert body == before


def test_validation_catches_a_broken_object() -> None:
    objs = render.render(_ws("workspace-phi-3-mini.yaml"), SETTINGS, [])
    dep = copy.deepcopy(_by_kind(objs)["Deployment"][0])
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    claim = copy.deepcopy(_by_kind(objs)["NodeClaim"][0])
    del claim["spec"]["nodeClassRef"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(claim, NODECLAIM_SCHEMA)


def test_nodeclaim_as_kaito_makes_it() -> None:
    objs = render.render(_ws("workspace-phi-3-mini.yaml"), SETTINGS, [])
    claim = _by_kind(objs)["NodeClaim"][0]
    spec = claim["spec"]
    assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_NC6s_v3"]} in spec["requirements"]
    assert spec["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert spec["resources"]["requests"]["storage"] == "80Gi"  # phi-3-mini's disk
    assert claim["metadata"]["labels"]["apps"] == "phi-3"  # the selector's labels reach the node
    assert claim["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"


def test_nodeclaims_only_for_missing_nodes_and_never_in_byo_mode() -> None:
    body = _ws("workspace-phi-3-mini.yaml")
    body["resource"]["count"] = 3
    labels = {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"}
    nodes = [_node("gpu-1", labels), _node("gpu-2", labels, ready=False), _node("cpu-1", {"apps": "phi-3"})]
    claims = _by_kind(render.render(body, SETTINGS, nodes))["NodeClaim"]
    assert len(claims) == 2  # 3 wanted, one Ready matching node already there
    assert len({c["metadata"]["name"] for c in claims}) == 2
    body["resource"]["preferredNodes"] = ["cpu-1"]
    assert len(_by_kind(render.render(body, SETTINGS, nodes))["NodeClaim"]) == 1
    byo = render.render(body, replace(SETTINGS, bring_your_own_nodes=True), [])
    assert "NodeClaim" not in _by_kind(byo)


def test_inference_pod_contract() -> None:
    objs = render.render(_ws("workspace-phi-3-mini.yaml"), SETTINGS, [])
    svc = _by_kind(objs)["Service"][0]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0]["port"] == 80 and svc["spec"]["ports"][0]["targetPort"] == 5000
    # The seed's `kubectl get svc` PORT(S) column, for a single node too.
    assert ",".join(f"{p['port']}/{p['protocol']}" for p in svc["spec"]["ports"]) == "80/TCP,29500/TCP"
    pod = _pod(objs, "Deployment")
    c = pod["containers"][0]
    assert c["image"] == "mcr.microsoft.com/aks/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    assert c["command"] == [
        "python", "-m", "kaito.runtime", "--preset", "phi-3-mini-4k-instruct", "--model-dir", "/workspace/weights",
        "--adapters-dir", "/mnt/adapter", "--port", "5000", "--config", "/mnt/config/inference_config.yaml",
    ]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"  # Standard_NC6s_v3 has one V100
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": 5000}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/mnt/config", "/mnt/adapter"} <= mounts
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    tol = {(t["key"], t.get("value")) for t in pod["tolerations"]}
    assert ("nvidia.com/gpu", None) in tol and ("sku", "gpu") in tol
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert {"key": "apps", "operator": "In", "values": ["phi-3"]} in term["matchExpressions"]


def test_registry_setting_and_private_preset_image() -> None:
    objs = render.render(_ws("workspace-phi-3-mini.yaml"), replace(SETTINGS, registry="myacr.io/kaito"), [])
    assert _pod(objs, "Deployment")["containers"][0]["image"] == "myacr.io/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    body = _ws("workspace-phi-3-mini.yaml")
    body["inference"]["preset"].update(
        accessMode="private", presetOptions={"image": "myacr.io/private/phi:9", "imagePullSecrets": ["acr"]}
    )
    pod = _pod(render.render(body, SETTINGS, []), "Deployment")
    assert pod["containers"][0]["image"] == "myacr.io/private/phi:9"
    assert pod["imagePullSecrets"] == [{"name": "acr"}]


def test_adapters_init_containers_env_and_rollout_hash() -> None:
    body = _ws("workspace-phi-3-mini-adapter.yaml")
    body["inference"]["adapters"][0]["source"]["imagePullSecrets"] = ["acr-pull"]
    objs = render.render(body, SETTINGS, [])
    _validate_all(objs)
    pod = _pod(objs, "Deployment")
    init = pod["initContainers"][0]
    assert init["image"] == "mcr.microsoft.com/aks/kaito/kaito-base:0.1.0"
    assert init["command"] == [
        "kaito", "image", "pull", "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1", "/mnt/adapter/phi-3-adapter",
    ]
    assert {"name": "pull-phi-3-adapter", "mountPath": "/var/run/secrets/kaito/docker", "readOnly": True} in init["volumeMounts"]
    assert {"name": "phi-3-adapter", "value": "1.0"} in pod["containers"][0]["env"]
    assert {"name": "acr-pull"} in pod["imagePullSecrets"]
    before = _by_kind(objs)["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]["kaito.sh/adapters-hash"]
    body["inference"]["adapters"][0]["strength"] = "0.3"
    after_objs = render.render(body, SETTINGS, [])
    after = _by_kind(after_objs)["Deployment"][0]
    assert after["spec"]["template"]["metadata"]["annotations"]["kaito.sh/adapters-hash"] != before
    assert {"name": "phi-3-adapter", "value": "0.3"} in after["spec"]["template"]["spec"]["containers"][0]["env"]


def test_load_balancer_annotation() -> None:
    body = _ws("workspace-phi-3-mini.yaml", annotations={"kaito.sh/enablelb": "True"})
    assert _by_kind(render.render(body, SETTINGS, []))["Service"][0]["spec"]["type"] == "LoadBalancer"


def test_user_named_config_map_is_mounted_not_created() -> None:
    body = _ws("workspace-phi-3-mini.yaml")
    body["inference"]["config"] = "my-inference-params"
    objs = render.render(body, SETTINGS, [])
    assert "ConfigMap" not in _by_kind(objs)
    assert {"name": "config", "configMap": {"name": "my-inference-params"}} in _pod(objs, "Deployment")["volumes"]


def test_multi_node_statefulset_with_torchrun() -> None:
    body = _ws("workspace-phi-3-mini.yaml")
    body["inference"]["preset"]["name"] = "falcon-40b"
    body["resource"].update(count=2, instanceType="Standard_NC24ads_A100_v4")
    objs = render.render(body, SETTINGS, [])
    _validate_all(objs)
    kinds = _by_kind(objs)
    assert "Deployment" not in kinds and len(kinds["StatefulSet"]) == 1
    sts = kinds["StatefulSet"][0]
    headless = next(s for s in kinds["Service"] if s["spec"].get("clusterIP") == "None")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    cmd = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    name = body["metadata"]["name"]
    assert cmd[:11] == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "$(POD_INDEX)",
        "--master-addr", f"{name}-0.{name}-headless", "--master-port", "29500",
    ]
    assert cmd[11:15] == ["-m", "kaito.runtime", "--preset", "falcon-40b"]
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    main_svc = next(s for s in kinds["Service"] if s["metadata"]["name"] == name)
    assert main_svc["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"


def test_weights_from_modelpack_mode() -> None:
    settings = replace(SETTINGS, weights_from_modelpack=True, registry="reg.local/kaito")
    pod = _pod(render.render(_ws("workspace-phi-3-mini.yaml"), settings, []), "Deployment")
    init = pod["initContainers"][0]
    assert init["command"] == [
        "kaito", "image", "pull", "reg.local/kaito/kaito-phi-3-mini-4k-instruct-weights:0.1.1", "/workspace/weights",
    ]
    assert pod["containers"][0]["image"] == "reg.local/kaito/kaito-base:0.1.0"
    assert {"name": "weights", "mountPath": "/workspace/weights"} in pod["containers"][0]["volumeMounts"]


def test_tuning_job_contract() -> None:
    objs = render.render(_ws("workspace-tuning-phi-3.yaml"), SETTINGS, [])
    kinds = _by_kind(objs)
    cm = kinds["ConfigMap"][0]
    assert yaml.safe_load(cm["data"]["training_config.yaml"])["training_config"]["QuantizationConfig"]["load_in_4bit"]
    job = kinds["Job"][0]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    init = pod["initContainers"][0]
    assert init["command"][:5] == ["kaito", "tune", "fetch-data", "--dest", "/mnt/data"]
    assert init["command"][5].startswith("https://huggingface.co/datasets/philschmid/dolly-15k-oai-style/")
    trainer = pod["containers"][0]
    assert trainer["command"] == [
        "python", "-m", "kaito.tuning", "--config", "/mnt/config/training_config.yaml",
        "--preset", "phi-3-mini-128k-instruct", "--method", "qlora", "--data", "/mnt/data", "--output", "/mnt/results",
        "--push", "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1", "--push-secret", "/var/run/secrets/kaito/docker/config.json",
    ]
    secret = next(v for v in pod["volumes"] if v["name"] == "push-secret")["secret"]
    assert secret == {
        "secretName": "ACR_REGISTRY_SECRET_HERE",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
    }
    assert {"name": "push-secret", "mountPath": "/var/run/secrets/kaito/docker", "readOnly": True} in trainer["volumeMounts"]


@pytest.mark.parametrize("source", ["image", "volume"])
def test_tuning_inputs_and_volume_output(source: str) -> None:
    body = _ws("workspace-tuning-phi-3.yaml")
    del body["tuning"]["input"]["urls"]
    if source == "image":
        body["tuning"]["input"].update(image="reg.local/data:1", imagePullSecrets=["pull"])
    else:
        body["tuning"]["input"]["volumeSource"] = {"persistentVolumeClaim": {"claimName": "dolly"}}
    body["tuning"]["output"] = {"volumeSource": {"persistentVolumeClaim": {"claimName": "results"}}}
    objs = render.render(body, SETTINGS, [])
    _validate_all(objs)
    pod = _pod(objs, "Job")
    volumes = {v["name"]: v for v in pod["volumes"]}
    if source == "image":
        assert pod["initContainers"][0]["command"] == ["kaito", "image", "pull", "reg.local/data:1", "/mnt/data"]
    else:
        assert "initContainers" not in pod
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "dolly"}
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "results"}
    assert "--push" not in pod["containers"][0]["command"]


def test_default_training_configs_follow_the_method() -> None:
    for method, quantized in (("lora", False), ("qlora", True)):
        doc = yaml.safe_load(render_tuning.default_training_config(method))["training_config"]
        assert bool((doc.get("QuantizationConfig") or {}).get("load_in_4bit")) is quantized
        assert doc["TrainingArguments"]["output_dir"] == "/mnt/results"


def test_job_state_reads_conditions() -> None:
    assert render_tuning.job_state(None)[0] is None
    assert render_tuning.job_state({"status": {"active": 1}})[0] is None
    assert render_tuning.job_state({"status": {"succeeded": 1}})[0] is True
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                          "message": "Job has reached the specified backoff limit"}]}}
    state, msg = render_tuning.job_state(failed)
    assert state is False and "backoff limit" in msg


def test_raw_pod_template_runs_as_given() -> None:
    body = _ws("workspace-phi-3-mini.yaml")
    del body["inference"]["preset"]
    body["inference"]["template"] = {
        "metadata": {"labels": {"app": "custom"}},
        "spec": {"containers": [{"name": "server", "image": "ghcr.io/me/server:1", "ports": [{"containerPort": 5000}]}]},
    }
    objs = render.render(body, SETTINGS, [])
    _validate_all(objs)
    dep = _by_kind(objs)["Deployment"][0]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/me/server:1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "custom" and labels["kaito.sh/workspace"] == body["metadata"]["name"]
    assert "ConfigMap" not in _by_kind(objs)
