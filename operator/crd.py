"""Generates the Workspace CRD from the pydantic models in `kaito.operator.schema`.

Called by `kaito operator crd` (which `make crd` runs) and by the staleness
test that compares the output with deploy/crd/kaito.sh_workspaces.yaml. The
conversion turns pydantic's JSON schema into a structural OpenAPI v3 schema:
refs inlined, Optional[X] as X, free-form dicts (volume sources, pod
templates) as `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

from typing import Any

import yaml
from kaito.operator import schema

_KEEP = ("description", "type", "enum", "minimum", "maximum", "items", "properties", "required", "format")


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        out = _convert(target, defs)
        if "description" in node:
            out["description"] = node["description"]
        return out
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express union {node} in a structural schema")
        out = _convert(branches[0], defs)
        if "description" in node:
            out["description"] = node["description"]
        if "default" in node and node["default"] is not None:
            out["default"] = node["default"]
        return out
    out = {}
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    if "enum" in node and "type" not in node:
        node = {**node, "type": "string"}
    for key in _KEEP:
        if key not in node:
            continue
        if key == "properties":
            out["properties"] = {k: _convert(v, defs) for k, v in node["properties"].items()}
        elif key == "items":
            out["items"] = _convert(node["items"], defs)
        elif key == "minimum" and "exclusiveMinimum" in node:
            continue
        else:
            out[key] = node[key]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"] + 1
    if "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    if out.get("type") == "object" and "properties" not in out:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra.get("type") == "string":
            out["additionalProperties"] = {"type": "string"}
        else:
            # A free-form dict (volumeSource, pod template): kept as the user wrote it.
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type[schema.Workspace]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of one Workspace version."""
    js = model.model_json_schema(by_alias=True, mode="validation")
    defs = js.get("$defs", {})
    out = _convert(js, defs)
    props = out["properties"]
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    out.pop("required", None)  # resource is enforced by admission so the message names the field
    return out


def _cond_column(name: str, ctype: str) -> dict[str, Any]:
    return {"name": name, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{ctype}")].status'}


def printer_columns(version: str) -> list[dict[str, Any]]:
    """`kubectl get workspace` columns: the seed's for v1alpha1, both generations' for v1beta1.

    The seed tells users to wait for WORKSPACEREADY (INSTANCE, RESOURCEREADY, INFERENCEREADY,
    WORKSPACEREADY, AGE); newer Kaito shows JOBSTARTED and WORKSPACESUCCEEDED. kubectl asks for
    the preferred version (v1beta1), so that one carries WorkspaceReady too.
    """
    instance = {"name": "Instance", "type": "string", "jsonPath": ".resource.instanceType", "description": "GPU SKU"}
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    columns = [instance, _cond_column("ResourceReady", "ResourceReady"), _cond_column("InferenceReady", "InferenceReady")]
    if version != "v1alpha1":
        columns += [_cond_column("JobStarted", "JobStarted"), _cond_column("WorkspaceSucceeded", "WorkspaceSucceeded")]
    return [*columns, _cond_column("WorkspaceReady", "WorkspaceReady"), age]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object for workspaces.kaito.sh."""
    versions = []
    for version in schema.VERSIONS:
        versions.append(
            {
                "name": version,
                "served": True,
                "storage": version == schema.STORAGE_VERSION,
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns(version),
                "schema": {"openAPIV3Schema": openapi_schema(schema.MODELS[version])},
            }
        )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{schema.PLURAL}.{schema.GROUP}"},
        "spec": {
            "group": schema.GROUP,
            "names": {
                "kind": schema.KIND,
                "listKind": f"{schema.KIND}List",
                "plural": schema.PLURAL,
                "singular": "workspace",
                "shortNames": ["wk", "wks"],
                "categories": ["kaito"],
            },
            "scope": "Namespaced",
            "conversion": {"strategy": "None"},
            "versions": versions,
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    # Shared lists (enum values) would otherwise be written as YAML anchors.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def crd_yaml() -> str:
    header = "# Generated by `kaito operator crd` from kaito.operator.schema; do not edit by hand.\n"
    return header + dump_yaml([build_crd()])
