"""Install manifests: deploy/ is generated and current, the Helm chart renders the same, all validate.

`helm` is not installable here (no Debian/PyPI package), so `render_chart`
renders the chart with the small Go-template subset the chart is restricted to:
`{{ .Values.a.b }}`, `{{ .Release.Namespace }}` and `| quote`. Anything else in
a template fails the test, so the chart cannot silently outgrow the check.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kaito.operator import deploy
from kaito.operator.kube import KINDS
from kaito.operator.settings import OperatorSettings
from kaito.presets.cli import main

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kaito"
K8S_VERSION = "1.30.0"
_EXPR = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def render_chart(chart: Path, namespace: str, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for k, v in (overrides or {}).items():
        node = values
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v

    def sub(m: re.Match[str]) -> str:
        expr = m.group(1)
        parts = [p.strip() for p in expr.split("|")]
        head = parts[0]
        if head == ".Release.Namespace":
            value: Any = namespace
        elif head.startswith(".Values."):
            value = _lookup(values, head[len(".Values."):])
        else:
            raise AssertionError(f"template expression outside the supported subset: {expr!r}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        for fn in parts[1:]:
            if fn != "quote":
                raise AssertionError(f"template function outside the supported subset: {fn!r}")
            text = json.dumps(text)
        return text

    docs: list[dict[str, Any]] = []
    for tpl in sorted((chart / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(_EXPR.sub(sub, tpl.read_text())) if d]
    return docs


def test_deploy_manifests_are_current(tmp_path: Path) -> None:
    assert (ROOT / "deploy/operator.yaml").read_text() == deploy.manifests_yaml(), \
        "deploy/operator.yaml is stale: run `kaito operator manifests --out-dir .`"
    assert main(["operator", "manifests", "--out-dir", str(ROOT), "--check"]) == 0
    assert main(["operator", "manifests", "--out-dir", str(tmp_path), "--check"]) == 1


def test_chart_renders_the_same_objects_as_deploy() -> None:
    from_chart = render_chart(CHART, "kaito-system")
    from_deploy = [o for o in yaml.safe_load_all((ROOT / "deploy/operator.yaml").read_text()) if o]
    assert [o for o in from_deploy if o["kind"] != "Namespace"] == from_chart
    assert (CHART / "crds/kaito.sh_workspaces.yaml").read_text() == (ROOT / "deploy/crd/kaito.sh_workspaces.yaml").read_text()


def test_chart_values_change_the_rendering_like_deploy_values() -> None:
    chart = render_chart(CHART, "gpu-ops", {"registry": "myacr.io/kaito", "bringYourOwnNodes": True,
                                             "image.tag": "9.9.9", "webhook.port": 9443})
    values = deploy.DeployValues(namespace="gpu-ops", registry="myacr.io/kaito", bring_your_own_nodes=True,
                                 image="mcr.microsoft.com/aks/kaito/kaito-operator:9.9.9", webhook_port=9443)
    assert chart == [o for o in deploy.build(values) if o["kind"] != "Namespace"]


def test_unsupported_template_syntax_is_refused(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "values.yaml").write_text("a: 1\n")
    (tmp_path / "templates/x.yaml").write_text("x: {{ include \"foo\" . }}\n")
    with pytest.raises(AssertionError, match="subset"):
        render_chart(tmp_path, "ns")


def test_deploy_objects_validate() -> None:
    checked = 0
    for obj in deploy.build():
        if obj["apiVersion"].startswith("cert-manager.io/"):
            continue  # cert-manager's CRDs are not in Kubernetes' schemas
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    assert checked == 7
    crd = yaml.safe_load((ROOT / "deploy/crd/kaito.sh_workspaces.yaml").read_text())
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_operator_deployment_settings_round_trip() -> None:
    dep = next(o for o in deploy.build() if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = OperatorSettings.from_env(env)
    assert settings.registry == "mcr.microsoft.com/aks/kaito"
    assert settings.webhook_port == 8443 and settings.webhook_cert_dir == "/certs"
    assert settings.bring_your_own_nodes is False
    assert OperatorSettings.from_env({"KAITO_BRING_YOUR_OWN_NODES": "true"}).bring_your_own_nodes is True


def test_rbac_covers_every_kind_the_client_touches() -> None:
    granted = {(g, r) for g, rs, _ in deploy.RBAC_RULES for r in rs}
    for kind in KINDS.values():
        group = kind.api_version.rsplit("/", 1)[0] if "/" in kind.api_version else ""
        assert (group, kind.plural) in granted, kind
    verbs = {v for _, _, vs in deploy.RBAC_RULES for v in vs}
    assert "*" not in verbs and "update" not in verbs  # least privilege: merge patches only


def test_cli_render_prints_valid_children(capsys: pytest.CaptureFixture[str]) -> None:
    example = ROOT / "deploy/examples/workspace-phi-3-mini.yaml"
    assert main(["operator", "render", str(example), "--ready-nodes", "1", "--registry", "reg.local"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Deployment"]
    assert docs[2]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("reg.local/kaito-phi-3-mini")


def test_cli_render_rejects_invalid_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ws.yaml"
    bad.write_text("metadata: {name: x}\nresource: {labelSelector: {matchLabels: {a: b}}}\n")
    assert main(["operator", "render", str(bad)]) == 2
    assert "inference/tuning" in capsys.readouterr().err


def test_operator_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, kaito.operator.cli, kaito.operator.handlers, kaito.operator.render, kaito.operator.reconcile;"
        "from kaito.operator.render_tuning import default_training_config; default_training_config('qlora');"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers') or m.startswith('kaito.tuning')];"
        "print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
