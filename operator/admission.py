"""Admission rules for Workspaces (Kaito's spec section 1).

Called by the validating webhook (`kaito.operator.handlers`, on create and
update), by the reconcile handlers before they render anything, so that a
cluster without the webhook still reports the error (as a False condition and
an Event), and by `kaito operator render` (through `load_manifest`). Every
message names the field and says how to fix it; no input, however malformed
(a string for metadata, a binary file), gets past as anything but a
`WorkspaceInvalid`. Pure: reads only the objects given and the preset catalog.
Name and URL rules come from `kaito.presets.validate`, image references from
the image builder's parser: one rule each for every package.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from kaito.image_builder.oci.errors import BadReference
from kaito.image_builder.oci.reference import parse_reference
from kaito.operator import render_inference, schema
from kaito.presets import InvalidInput, UnknownPreset, contract, default_registry, get_preset, get_sku
from kaito.presets.skus import DEFAULT_MAX_REPLICAS, count_problem
from kaito.presets.errors import validation_problem
from kaito.presets.spec import AccessMode, PresetSpec, quantization_problem
from kaito.presets.validate import LABEL_MAX, dns_label_problem, dns_subdomain_problem, http_url_problem
from kaito.presets.yamlio import parse_mapping
from pydantic import ValidationError

MAX_ADAPTERS = 10
API_VERSIONS = tuple(f"{schema.GROUP}/{v}" for v in schema.VERSIONS)
# Names the operator derives from a workspace's name that Kubernetes caps at 63 characters
# (label values and DNS labels); the longest suffix decides the longest workspace name.
# Every child carries the label kaito.sh/workspace=<name>, the Service is <name>, the
# multi-node headless Service <name>-headless, and a StatefulSet's pods carry the label
# controller-revision-hash=<name>-<hash of up to 10 characters>.
STATEFULSET_REVISION_SUFFIX = 11


class WorkspaceInvalid(InvalidInput):
    """A Workspace that breaks admission rules; `.errors` lists one message per field."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def load_manifest(raw: bytes, source: str) -> dict[str, Any]:
    """Read one Workspace manifest from bytes (a file given to `kaito operator render`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WorkspaceInvalid([f"{source}: not UTF-8 text (a binary file?); give a Workspace YAML file"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WorkspaceInvalid([f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}"]) from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        got = f"{len(docs)} documents" if len(docs) != 1 else type(docs[0]).__name__
        raise WorkspaceInvalid([f"{source}: expected one Workspace mapping, got {got}"])
    return docs[0]


def _check_header(body: dict[str, Any], errors: list[str]) -> None:
    """apiVersion, kind and the metadata fields the operator reads, before the schema parses them."""
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if api_version not in API_VERSIONS:
        got = "is required" if api_version is None else f"{api_version!r} is not served"
        errors.append(f"apiVersion: {got}; use one of {', '.join(API_VERSIONS)}")
    if kind != schema.KIND:
        got = "is required" if kind is None else f"{kind!r} is not {schema.KIND}"
        errors.append(f"kind: {got}; this operator admits kind: {schema.KIND}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        errors.append(f"metadata: must be a mapping with at least a name, got {type(meta).__name__}")
        return
    if "name" not in meta and meta.get("generateName"):
        problem = dns_label_problem(meta["generateName"] + "a", letter_first=True)
        if problem:
            errors.append(f"metadata.generateName: {problem}")
    elif not isinstance(meta.get("name"), str) or not meta["name"]:
        errors.append("metadata.name: is required (a lowercase DNS-1123 name, e.g. workspace-phi-3-mini)")
    for key in ("annotations", "labels"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            errors.append(f"metadata.{key}: must be a mapping of strings to strings (quote values like \"True\")")
    namespace = meta.get("namespace")
    if namespace is not None and dns_label_problem(namespace):
        errors.append(f"metadata.namespace: {dns_label_problem(namespace)}")


def _schema_message(err: Any) -> str:
    if err["loc"] == ("resource", "count") and err["type"] == "less_than_equal":
        return (
            f"resource.count: {err['input']!r} is above the schema's hard cap of {schema.MAX_NODES}; each preset "
            "and SKU allow far fewer (1 to KAITO_MAX_REPLICAS replicas, or the nodes a distributed preset needs)"
        )
    return validation_problem(err)


def _parse(body: Any) -> tuple[schema.Workspace | None, list[str]]:
    """(the parsed Workspace or None, field-named errors so far): header and schema checks."""
    if not isinstance(body, dict):
        return None, [f"(document): a Workspace is a mapping, got {type(body).__name__}"]
    errors: list[str] = []
    _check_header(body, errors)
    if "resource" not in body:
        errors.append("resource: is required (instanceType, count and labelSelector of the GPU nodes)")
    if "resource" not in body or any(e.startswith("metadata") for e in errors):
        return None, errors  # the rest reads metadata and resource: report these first
    data = {k: v for k, v in body.items() if k != "status"}
    try:
        return schema.Workspace.model_validate(data), errors
    except ValidationError as e:
        return None, errors + [_schema_message(err) for err in e.errors()]


def parse(body: Any) -> schema.Workspace:
    """Parse a Workspace object; raise WorkspaceInvalid with field-named messages."""
    ws, errors = _parse(body)
    if ws is None or errors:
        raise WorkspaceInvalid(errors)
    return ws


def _check_name(ws: schema.Workspace, preset: PresetSpec | None, errors: list[str]) -> None:
    if not ws.name:  # generateName: the API server picks the name
        return
    limit, why = LABEL_MAX, "the Service and the kaito.sh/workspace label of every child carry it"
    if ws.inference is not None and render_inference.is_distributed(ws, preset):
        limit = LABEL_MAX - STATEFULSET_REVISION_SUFFIX
        why = "the StatefulSet's pods carry the label controller-revision-hash=<name>-<hash>"
    problem = dns_label_problem(ws.name, limit, letter_first=True)
    if problem:
        errors.append(f"metadata.name: {problem} ({why})")


def check_image(field: str, ref: str | None, errors: list[str]) -> None:
    """A registry image reference (host/repo[:tag][@digest]) in the OCI grammar, as a pod or the puller needs it.

    Upper case in the name is let through: the seed's own placeholders
    (`ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1`) must be admitted unchanged, as Kaito
    admits them; every other part (spaces, tag, digest, separators) must be valid.
    """
    if not ref:
        return
    head, at, digest = ref.partition("@")
    cut = head.rfind(":") if head.rfind(":") > head.rfind("/") else len(head)
    try:
        parsed = parse_reference(head[:cut].lower() + head[cut:] + at + digest, field)
    except BadReference as e:
        errors.append(f"{e}; give host/repository[:tag], e.g. myregistry.azurecr.io/adapter:0.0.1")
        return
    if parsed.registry is None:
        errors.append(f"{field}: {ref!r} is not a registry reference; give host/repository[:tag]")


def _check_object_name(field: str, name: str | None, errors: list[str]) -> None:
    if name is not None:
        problem = dns_subdomain_problem(name)
        if problem:
            errors.append(f"{field}: {problem}")


def _check_source(field: str, src: schema.DataSource, errors: list[str]) -> None:
    check_image(f"{field}.image", src.image, errors)
    for i, url in enumerate(src.urls or []):
        problem = http_url_problem(url)
        if problem:
            errors.append(f"{field}.urls[{i}]: {problem}")


def _preset(field: str, name: str, errors: list[str]) -> PresetSpec | None:
    try:
        return get_preset(name)
    except UnknownPreset as e:
        errors.append(f"{field}: {e}")
        return None


def _check_preset_access(field: str, spec: schema.PresetSpec, preset: PresetSpec, errors: list[str]) -> None:
    image = spec.preset_options.image if spec.preset_options else None
    if spec.access_mode == "private" and not image:
        errors.append(f"{field}.presetOptions.image: accessMode private needs the image of your private preset")
    if preset.access_mode == AccessMode.private and spec.access_mode != "private":
        errors.append(
            f"{field}.accessMode: preset {preset.name} is private; set accessMode: private and presetOptions.image"
        )
    options = spec.preset_options or schema.PresetOptions()
    check_image(f"{field}.presetOptions.image", options.image, errors)
    secret_field = f"{field}.presetOptions.modelAccessSecret"
    downloads = preset.download_at_runtime and spec.access_mode != "private"
    if downloads and not options.model_access_secret:
        errors.append(
            f"{secret_field}: preset {preset.name} downloads its weights from Hugging Face at start; give the name "
            f"of a Secret holding your token under key {contract.ENV_HF_TOKEN} "
            f"(kubectl create secret generic hf-token --from-literal={contract.ENV_HF_TOKEN}=hf_...)"
        )
    elif options.model_access_secret and not downloads:
        errors.append(f"{secret_field}: preset {preset.name} ships its weights in its image; remove modelAccessSecret")


def _check_resource(ws: schema.Workspace, preset: PresetSpec | None, max_replicas: int, errors: list[str]) -> None:
    sel = ws.resource.label_selector
    if not (sel.match_labels or sel.match_expressions):
        errors.append("resource.labelSelector: give matchLabels or matchExpressions selecting the GPU nodes")
    count = ws.resource.count
    bypass = ws.annotations.get(schema.ANN_BYPASS) is not None
    if ws.inference is not None and (bypass or preset is None) and count > max_replicas:
        # No preset/SKU rule to apply (a template, or the checks bypassed): the replica cap still holds.
        errors.append(
            f"resource.count: {count} is too many: allowed 1 to {max_replicas} replicas "
            "(the operator's KAITO_MAX_REPLICAS) when no preset is checked against the SKU"
        )
    if bypass:
        return
    try:
        sku = get_sku(ws.resource.instance_type)
    except InvalidInput as e:
        errors.append(f"resource.instanceType: {e} (or annotate {schema.ANN_BYPASS} to skip the check)")
        return
    if preset is None or ws.inference is None:
        return  # tuning runs on exactly one node: checked with the tuning fields
    try:
        problem = count_problem(preset, sku, count, max_replicas)
    except InvalidInput as e:  # no count of this SKU can serve the preset
        errors.append(f"resource.instanceType: {e}")
        return
    if problem:
        errors.append(f"resource.count: {problem}")


def _check_adapters(adapters: list[schema.AdapterSpec], errors: list[str]) -> None:
    if len(adapters) > MAX_ADAPTERS:
        errors.append(f"inference.adapters: at most {MAX_ADAPTERS} adapters, got {len(adapters)}")
    seen: set[str] = set()
    for i, adapter in enumerate(adapters):
        field = f"inference.adapters[{i}]"
        name = adapter.source.name or ""  # "" fails the label check as "is required"
        # Each adapter's init container is named adapter-<name>, a DNS-1123 label itself.
        problem = dns_label_problem(name, LABEL_MAX - len(render_inference.ADAPTER_INIT_PREFIX))
        if problem:
            errors.append(f"{field}.source.name: {problem}")
        elif name in seen:
            errors.append(f"{field}.source.name: duplicate adapter name {name!r}; names must be unique")
        else:
            seen.add(name)
        if not adapter.source.image:
            errors.append(f"{field}.source.image: give the image holding the adapter")
        _check_source(f"{field}.source", adapter.source, errors)
        if adapter.strength is not None:
            try:
                strength = float(adapter.strength)
            except ValueError:
                errors.append(f"{field}.strength: {adapter.strength!r} is not a number; use a float in [0,1]")
                continue
            if not 0.0 <= strength <= 1.0:
                errors.append(f"{field}.strength: {adapter.strength} is outside [0,1]")


def check_training_config(method: str, text: str, field: str = "tuning.config") -> list[str]:
    """Kaito's quantization rule (`kaito.presets.spec.quantization_problem`) on a training_config.yaml."""
    try:
        doc = parse_mapping(text, f"{field}: training_config.yaml", "a mapping with the key training_config")
    except InvalidInput as e:
        return [str(e)]
    if not isinstance(doc.get("training_config"), dict):
        return [f"{field}: training_config.yaml must have a top-level mapping 'training_config'"]
    quant = doc["training_config"].get("QuantizationConfig")
    if quant is not None and not isinstance(quant, dict):
        return [f"{field}: training_config.QuantizationConfig must be a mapping, got {type(quant).__name__}"]
    problem = quantization_problem(method, quant)
    return [f"{field}: {problem}"] if problem else []


def _check_tuning(ws: schema.Workspace, errors: list[str]) -> PresetSpec | None:
    tuning = ws.tuning
    assert tuning is not None
    preset = _preset("tuning.preset.name", tuning.preset.name, errors)
    if preset is not None:
        _check_preset_access("tuning.preset", tuning.preset, preset, errors)
        if tuning.method not in preset.tunable_methods:
            can = ", ".join(preset.tunable_methods) or "none"
            errors.append(f"tuning.method: preset {preset.name} cannot be tuned with {tuning.method} (supported: {can})")
    given = [k for k in ("urls", "image", "volumeSource") if getattr(tuning.input, _py(k))]
    if len(given) != 1:
        errors.append(f"tuning.input: give exactly one of urls, image, volumeSource (got {', '.join(given) or 'none'})")
    _check_source("tuning.input", tuning.input, errors)
    out = tuning.output
    check_image("tuning.output.image", out.image, errors)
    if bool(out.image) == bool(out.volume_source):
        errors.append("tuning.output: give exactly one of image (with imagePushSecret) or volumeSource")
    if out.image and not out.image_push_secret:
        errors.append("tuning.output.imagePushSecret: pushing to tuning.output.image needs a push secret")
    if ws.resource.count != 1:
        errors.append(f"resource.count: tuning runs on exactly 1 node, got {ws.resource.count}")
    return preset


def _canonical(name: str) -> str:
    return default_registry().resolve(name)


def _py(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


def _check_update(new: dict[str, Any], old: dict[str, Any], errors: list[str]) -> None:
    """Immutability on raw bodies: `old` may be a minimal pinned spec, not a full Workspace."""
    if (old.get("inference") is None) != (new.get("inference") is None) or (old.get("tuning") is None) != (
        new.get("tuning") is None
    ):
        errors.append("inference/tuning: a workspace cannot switch between inference and tuning; create a new one")
        return
    r_old, r_new = old.get("resource") or {}, new.get("resource") or {}
    defaults = {"count": 1, "instanceType": schema.ResourceSpec.model_fields["instance_type"].default}
    for key in ("count", "instanceType", "labelSelector"):
        if r_old.get(key, defaults.get(key)) != r_new.get(key, defaults.get(key)):
            errors.append(f"resource.{key}: is immutable after creation")
    for part in ("inference", "tuning"):
        o, n = old.get(part) or {}, new.get(part) or {}
        o_name, n_name = (o.get("preset") or {}).get("name"), (n.get("preset") or {}).get("name")
        # A preset named by its alias or Hugging Face repo is the same preset.
        if isinstance(o_name, str) and isinstance(n_name, str) and _canonical(o_name) != _canonical(n_name):
            errors.append(f"{part}.preset.name: is immutable after creation")
    if old.get("tuning") and new.get("tuning") and old["tuning"].get("method") != new["tuning"].get("method"):
        errors.append("tuning.method: is immutable after creation")


def validate(
    body: dict[str, Any], old: dict[str, Any] | None = None, max_replicas: int = DEFAULT_MAX_REPLICAS
) -> schema.Workspace:
    """Parse and check a Workspace (and, on update, its old version); raise WorkspaceInvalid.

    `max_replicas` is the operator's KAITO_MAX_REPLICAS (`OperatorSettings.max_replicas`).
    """
    ws, errors = _parse(body)
    if ws is None:
        raise WorkspaceInvalid(errors)
    preset: PresetSpec | None = None
    if (ws.inference is None) == (ws.tuning is None):
        errors.append("inference/tuning: give exactly one of inference and tuning")
    elif ws.inference is not None:
        inf = ws.inference
        if (inf.preset is None) == (inf.template is None):
            errors.append("inference: give exactly one of preset and template")
        elif inf.preset is not None:
            preset = _preset("inference.preset.name", inf.preset.name, errors)
            if preset is not None:
                _check_preset_access("inference.preset", inf.preset, preset, errors)
        if inf.adapters:
            if inf.preset is None:
                errors.append("inference.adapters: adapters need a preset (not a template)")
            _check_adapters(inf.adapters, errors)
    else:
        preset = _check_tuning(ws, errors)
    part = ws.inference if ws.inference is not None else ws.tuning
    if part is not None and part.config:
        _check_object_name(f"{'inference' if ws.inference is not None else 'tuning'}.config", part.config, errors)
    _check_name(ws, preset, errors)
    _check_resource(ws, preset, max_replicas, errors)
    if old is not None:
        _check_update(body, old, errors)
    if errors:
        raise WorkspaceInvalid(errors)
    return ws
