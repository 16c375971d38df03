"""Admission rules (spec section 1): each bad Workspace is rejected with a message naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from kaito.operator import admission
from kaito.operator.render_tuning import default_training_config
from op_harness import example_files, load_example

INF = "workspace-phi-3-mini.yaml"
ADAPTER = "workspace-phi-3-mini-adapter.yaml"
TUNE = "workspace-tuning-phi-3.yaml"


def _errors(body: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(admission.WorkspaceInvalid) as info:
        admission.validate(body, old)
    return info.value.errors


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_seed_examples_are_admitted(path: Any) -> None:
    ws = admission.validate(load_example(path.name))
    assert ws.name == load_example(path.name)["metadata"]["name"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        node = body
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        if value is _DEL:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


_DEL = object()
TUNING = load_example(TUNE)["tuning"]

CASES = [
    # (example, mutation, field the message must name, words it must contain)
    (INF, _set("tuning", TUNING), "inference/tuning", "exactly one"),
    (INF, _set("inference", _DEL), "inference/tuning", "exactly one"),
    (INF, _set("inference.preset.name", "phi-3-mega"), "inference.preset.name", "phi-3-mega"),
    (INF, _set("inference.preset.accessMode", "private"), "inference.preset.presetOptions.image", "private"),
    (INF, _set("inference.template", {"spec": {}}), "inference", "exactly one of preset and template"),
    (INF, _set("resource.instanceType", "Standard_D4s_v3"), "resource.instanceType", "Standard_NC6s_v3"),
    (INF, _set("resource.count", 0), "resource.count", "greater than or equal to 1"),
    (INF, _set("resource.labelSelector", {}), "resource.labelSelector", "matchLabels"),
    (INF, _set("resource", _DEL), "resource", "required"),
    (ADAPTER, _set("inference.adapters.0.strength", "1.5"), "inference.adapters[0].strength", "[0,1]"),
    (ADAPTER, _set("inference.adapters.0.strength", "strong"), "inference.adapters[0].strength", "float"),
    (ADAPTER, _set("inference.adapters.0.source.name", "Phi_Adapter"), "inference.adapters[0].source.name", "DNS-1123"),
    (ADAPTER, _set("inference.adapters.0.source.image", _DEL), "inference.adapters[0].source.image", "image"),
    (TUNE, _set("tuning.method", "dora"), "tuning.method", "lora"),
    (TUNE, _set("tuning.input.image", "reg/data:1"), "tuning.input", "exactly one"),
    (TUNE, _set("tuning.input.urls", _DEL), "tuning.input", "exactly one"),
    (TUNE, _set("tuning.output.imagePushSecret", _DEL), "tuning.output.imagePushSecret", "push secret"),
    (TUNE, _set("tuning.output.volumeSource", {"emptyDir": {}}), "tuning.output", "exactly one"),
    (TUNE, _set("resource.count", 2), "resource.count", "exactly 1 node"),
    (TUNE, _set("tuning.preset.name", "llama-3.1-8b-instruct"), "tuning.method", "cannot be tuned"),
]


@pytest.mark.parametrize("example,mutate,field,words", CASES, ids=[f"{c[2]}:{c[3]}" for c in CASES])
def test_rule_rejects_with_field_named(example: str, mutate: Any, field: str, words: str) -> None:
    body = load_example(example)
    mutate(body)
    errors = _errors(body)
    hits = [e for e in errors if e.startswith(field) and words in e]
    assert hits, f"no error on {field!r} containing {words!r}: {errors}"


def test_gpu_fit_names_rule_and_bypass_annotation_skips_it() -> None:
    body = load_example(INF)
    body["inference"]["preset"]["name"] = "falcon-40b"
    errors = _errors(body)
    assert any(e.startswith("resource.instanceType/count") and "falcon-40b" in e for e in errors), errors
    body["metadata"]["annotations"] = {"kaito.sh/bypass-resource-checks": "True"}
    assert admission.validate(body).inference.preset.name == "falcon-40b"


def test_more_than_ten_adapters_and_duplicates() -> None:
    body = load_example(ADAPTER)
    adapter = body["inference"]["adapters"][0]
    body["inference"]["adapters"] = [copy.deepcopy(adapter) for _ in range(11)]
    errors = _errors(body)
    assert any(e.startswith("inference.adapters:") and "at most 10" in e for e in errors)
    assert any("duplicate adapter name" in e for e in errors)


def test_several_errors_are_reported_together() -> None:
    body = load_example(TUNE)
    body["resource"]["count"] = 3
    del body["tuning"]["output"]["imagePushSecret"]
    errors = _errors(body)
    assert len(errors) == 2, errors


@pytest.mark.parametrize(
    "field,value",
    [
        ("resource.count", 2),
        ("resource.instanceType", "Standard_NC24ads_A100_v4"),
        ("resource.labelSelector", {"matchLabels": {"apps": "other"}}),
        ("inference.preset.name", "phi-3-mini-128k-instruct"),
    ],
)
def test_immutable_fields_on_update(field: str, value: Any) -> None:
    old = load_example(INF)
    new = copy.deepcopy(old)
    _set(field, value)(new)
    errors = _errors(new, old)
    assert any(e.startswith(field) and "immutable" in e for e in errors), errors


def test_update_may_change_adapters_but_not_toggle_to_tuning() -> None:
    old = load_example(ADAPTER)
    new = copy.deepcopy(old)
    new["inference"]["adapters"][0]["strength"] = "0.5"
    assert admission.validate(new, old).inference.adapters[0].strength == "0.5"
    toggled = copy.deepcopy(old)
    del toggled["inference"]
    toggled["tuning"] = copy.deepcopy(TUNING)
    assert any("cannot switch" in e for e in _errors(toggled, old))
    old_t = load_example(TUNE)
    new_t = copy.deepcopy(old_t)
    new_t["tuning"]["method"] = "lora"
    assert any(e.startswith("tuning.method") and "immutable" in e for e in _errors(new_t, old_t))


def test_training_config_quantization_rule() -> None:
    assert admission.check_training_config("qlora", default_training_config("qlora")) == []
    assert admission.check_training_config("lora", default_training_config("lora")) == []
    errs = admission.check_training_config("lora", default_training_config("qlora"))
    assert errs and "must not quantize" in errs[0]
    errs = admission.check_training_config("qlora", default_training_config("lora"))
    assert errs and "load_in_4bit" in errs[0]
    assert "top-level" in admission.check_training_config("lora", "foo: 1")[0]


def test_immutability_against_the_pinned_minimal_spec() -> None:
    from kaito.operator.reconcile import _immutable

    old = load_example(TUNE)
    pinned = _immutable(old)
    assert set(pinned) == {"resource", "tuning"} and pinned["tuning"] == {
        "preset": {"name": "phi-3-mini-128k-instruct"}, "method": "qlora"}
    assert admission.validate(copy.deepcopy(old), pinned).tuning.method == "qlora"
    new = copy.deepcopy(old)
    new["tuning"]["method"] = "lora"
    new["resource"]["count"] = 1  # explicit default equals the pinned absent count
    errors = _errors(new, pinned)
    assert errors == ["tuning.method: is immutable after creation"], errors
