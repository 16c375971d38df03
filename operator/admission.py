"""Admission rules for Workspaces (Kaito's spec section 1).

Called by the validating webhook (`kaito.operator.handlers`, on create and
update) and by the reconcile handlers before they render anything, so that a
cluster without the webhook still reports the error (as a False condition and
an Event). Every message names the field and says how to fix it. Pure: reads
only the objects given and the preset catalog.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from kaito.operator import schema
from kaito.presets import InvalidInput, UnknownPreset, fit, get_preset, get_sku
from kaito.presets.spec import AccessMode, PresetSpec
from pydantic import ValidationError

MAX_ADAPTERS = 10
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class WorkspaceInvalid(InvalidInput):
    """A Workspace that breaks admission rules; `.errors` lists one message per field."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(body: dict[str, Any]) -> schema.Workspace:
    """Parse a Workspace object; pydantic errors become field-named messages."""
    data = {k: v for k, v in body.items() if k != "status"}
    if "resource" not in data:
        raise WorkspaceInvalid(["resource: is required (instanceType, count and labelSelector of the GPU nodes)"])
    try:
        return schema.Workspace.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            msgs.append(f"{_loc(err['loc'])}: {err['msg']}")
        raise WorkspaceInvalid(msgs) from None


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


def _check_resource(ws: schema.Workspace, preset: PresetSpec | None, errors: list[str]) -> None:
    sel = ws.resource.label_selector
    if not (sel.match_labels or sel.match_expressions):
        errors.append("resource.labelSelector: give matchLabels or matchExpressions selecting the GPU nodes")
    if ws.annotations.get(schema.ANN_BYPASS) is not None:
        return
    try:
        sku = get_sku(ws.resource.instance_type)
    except InvalidInput as e:
        errors.append(f"resource.instanceType: {e} (or annotate {schema.ANN_BYPASS} to skip the check)")
        return
    if preset is not None and ws.inference is not None:
        result = fit(preset, sku, ws.resource.count)
        if not result.ok:
            errors.append(f"resource.instanceType/count: {result.message}")


def _check_adapters(adapters: list[schema.AdapterSpec], errors: list[str]) -> None:
    if len(adapters) > MAX_ADAPTERS:
        errors.append(f"inference.adapters: at most {MAX_ADAPTERS} adapters, got {len(adapters)}")
    seen: set[str] = set()
    for i, adapter in enumerate(adapters):
        field = f"inference.adapters[{i}]"
        name = adapter.source.name
        if not name:
            errors.append(f"{field}.source.name: every adapter needs a name (DNS-1123 label)")
        elif len(name) > 63 or not DNS1123_LABEL.match(name):
            errors.append(
                f"{field}.source.name: {name!r} must be a DNS-1123 label (lowercase letters, digits, '-', <= 63)"
            )
        elif name in seen:
            errors.append(f"{field}.source.name: duplicate adapter name {name!r}; names must be unique")
        else:
            seen.add(name)
        if not adapter.source.image:
            errors.append(f"{field}.source.image: give the image holding the adapter")
        if adapter.strength is not None:
            try:
                strength = float(adapter.strength)
            except ValueError:
                errors.append(f"{field}.strength: {adapter.strength!r} is not a number; use a float in [0,1]")
                continue
            if not 0.0 <= strength <= 1.0:
                errors.append(f"{field}.strength: {adapter.strength} is outside [0,1]")


def check_training_config(method: str, text: str, field: str = "tuning.config") -> list[str]:
    """Kaito's quantization rule on a training_config.yaml: lora must not quantize, qlora must."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        return [f"{field}: training_config.yaml is not valid YAML: {e}"]
    if not isinstance(doc, dict) or not isinstance(doc.get("training_config"), dict):
        return [f"{field}: training_config.yaml must have a top-level mapping 'training_config'"]
    quant = doc["training_config"].get("QuantizationConfig") or {}
    four = bool(quant.get("load_in_4bit"))
    eight = bool(quant.get("load_in_8bit"))
    if method == "lora" and (four or eight):
        return [f"{field}: method lora must not quantize; remove load_in_4bit/load_in_8bit or use method qlora"]
    if method == "qlora" and not (four or eight):
        return [f"{field}: method qlora needs QuantizationConfig load_in_4bit or load_in_8bit: true"]
    return []


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
    out = tuning.output
    if bool(out.image) == bool(out.volume_source):
        errors.append("tuning.output: give exactly one of image (with imagePushSecret) or volumeSource")
    if out.image and not out.image_push_secret:
        errors.append("tuning.output.imagePushSecret: pushing to tuning.output.image needs a push secret")
    if ws.resource.count != 1:
        errors.append(f"resource.count: tuning runs on exactly 1 node, got {ws.resource.count}")
    return preset


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
        if o_name and n_name and o_name != n_name:
            errors.append(f"{part}.preset.name: is immutable after creation")
    if old.get("tuning") and new.get("tuning") and old["tuning"].get("method") != new["tuning"].get("method"):
        errors.append("tuning.method: is immutable after creation")


def validate(body: dict[str, Any], old: dict[str, Any] | None = None) -> schema.Workspace:
    """Parse and check a Workspace (and, on update, its old version); raise WorkspaceInvalid."""
    ws = parse(body)
    errors: list[str] = []
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
    _check_resource(ws, preset, errors)
    if old is not None:
        _check_update(body, old, errors)
    if errors:
        raise WorkspaceInvalid(errors)
    return ws
