"""The Workspace CRD: generated from the pydantic schema, never stale, admits the seed examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kaito.operator import crd, schema
from kaito.presets.cli import main
from op_harness import example_files

ROOT = Path(__file__).resolve().parents[2]


def _strict(node: Any) -> Any:
    """The CRD schema with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
        out.pop("x-kubernetes-preserve-unknown-fields", None)
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _version_schema(version: str) -> dict[str, Any]:
    for v in crd.build_crd()["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


@pytest.mark.parametrize("rel", ["deploy/crd/kaito.sh_workspaces.yaml", "charts/kaito/crds/kaito.sh_workspaces.yaml"])
def test_checked_in_crd_is_not_stale(rel: str) -> None:
    assert (ROOT / rel).read_text() == crd.crd_yaml(), f"{rel} is stale: run `kaito operator crd --out-dir .`"


def test_crd_check_command_detects_staleness(tmp_path: Path) -> None:
    assert main(["operator", "crd", "--out-dir", str(tmp_path)]) == 0
    assert main(["operator", "crd", "--out-dir", str(tmp_path), "--check"]) == 0
    path = tmp_path / "deploy/crd/kaito.sh_workspaces.yaml"
    path.write_text(path.read_text().replace("wks", "wkz"))
    assert main(["operator", "crd", "--out-dir", str(tmp_path), "--check"]) == 1


def test_crd_names_versions_and_columns() -> None:
    spec = crd.build_crd()["spec"]
    assert spec["names"]["shortNames"] == ["wk", "wks"]
    assert spec["scope"] == "Namespaced"
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        ("v1alpha1", True, False),
        ("v1beta1", True, True),
    ]
    # The seed's `kubectl get workspace` columns (upper-cased by kubectl) for v1alpha1, and
    # both generations' for v1beta1, the version kubectl prefers.
    seed = ["INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "WORKSPACEREADY", "AGE"]
    cols = {v["name"]: [c["name"].upper() for c in v["additionalPrinterColumns"]] for v in spec["versions"]}
    assert cols["v1alpha1"] == seed
    assert cols["v1beta1"] == seed[:3] + ["JOBSTARTED", "WORKSPACESUCCEEDED"] + seed[3:]
    for v in spec["versions"]:
        ready = next(c for c in v["additionalPrinterColumns"] if c["name"] == "WorkspaceReady")
        assert ready["jsonPath"] == '.status.conditions[?(@.type=="WorkspaceReady")].status'
        assert v["subresources"] == {"status": {}}
        props = v["schema"]["openAPIV3Schema"]["properties"]
        assert {"resource", "inference", "tuning", "status"} <= set(props)
        assert "spec" not in props


def _assert_structural(node: dict[str, Any], path: str) -> None:
    assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
    if not node.get("x-kubernetes-preserve-unknown-fields"):
        assert "type" in node, f"{path} has no type (not structural)"
    for name, child in (node.get("properties") or {}).items():
        _assert_structural(child, f"{path}.{name}")
    if "items" in node:
        _assert_structural(node["items"], f"{path}[]")


@pytest.mark.parametrize("version", schema.VERSIONS)
def test_schema_is_structural(version: str) -> None:
    _assert_structural(_version_schema(version), "$")


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", schema.VERSIONS)
def test_seed_examples_validate_unchanged(path: Path, version: str) -> None:
    body = yaml.safe_load(path.read_text())
    jsonschema.validate(body, _strict(_version_schema(version)))


def test_schema_rejects_wrong_types() -> None:
    body = yaml.safe_load(example_files()[0].read_text())
    bad = copy.deepcopy(body)
    bad["resource"]["count"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _strict(_version_schema("v1beta1")))
    bad = copy.deepcopy(body)
    bad["inference"]["preset"]["accessMode"] = "secret"
    with pytest.raises(jsonschema.ValidationError, match="secret"):
        jsonschema.validate(bad, _strict(_version_schema("v1beta1")))
