"""Admission rules (spec section 1): each bad Workspace is rejected with a message naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from kaito.operator import admission
from kaito.operator.render_tuning import default_training_config
from kaito.presets import get_preset
from yaml import safe_dump as yaml_dump
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
    # Names: DNS-1123 (DNS-1035 for the Service named after it), within Kubernetes' limits, present.
    (INF, _set("metadata.name", "My_Workspace!"), "metadata.name", "not a DNS-1035 label"),
    (INF, _set("metadata.name", "w" * 80), "metadata.name", "at most 63"),
    (INF, _set("metadata.name", "9lives"), "metadata.name", "start with a letter"),
    (INF, _set("metadata.name", _DEL), "metadata.name", "required"),
    (INF, _set("metadata", "x"), "metadata", "must be a mapping"),
    (INF, _set("metadata.annotations", ["a"]), "metadata.annotations", "mapping of strings"),
    (INF, _set("metadata.annotations", {"kaito.sh/enablelb": True}), "metadata.annotations", "strings"),
    (INF, _set("kind", "Pod"), "kind", "Workspace"),
    (INF, _set("kind", _DEL), "kind", "required"),
    (INF, _set("apiVersion", "kaito.sh/v1"), "apiVersion", "kaito.sh/v1beta1"),
    (INF, _set("apiVersion", "v1"), "apiVersion", "not served"),
    # Image references in the OCI grammar, http(s) URLs only.
    (ADAPTER, _set("inference.adapters.0.source.image", "not a ref"), "inference.adapters[0].source.image", "repository"),
    (ADAPTER, _set("inference.adapters.0.source.image", "oci:/tmp/layout"), "inference.adapters[0].source.image",
     "registry reference"),
    (ADAPTER, _set("inference.adapters.0.source.name", "a" * 56), "inference.adapters[0].source.name", "at most 55"),
    (ADAPTER, _set("inference.adapters.0.source.name", None), "inference.adapters[0].source.name", "is required"),
    (TUNE, _set("tuning.output.image", "UPPER/Case:tag!"), "tuning.output.image", "tag 'tag!'"),
    (TUNE, _set("tuning.output.image", "reg.io/a@sha256:beef"), "tuning.output.image", "digest"),
    (TUNE, _set("tuning.input.urls", ["not a url"]), "tuning.input.urls[0]", "only http:// and https://"),
    (TUNE, _set("tuning.input.urls", ["file:///etc/passwd"]), "tuning.input.urls[0]", "scheme 'file'"),
    (TUNE, _set("tuning.input.urls", ["https://"]), "tuning.input.urls[0]", "host"),
    (INF, _set("inference.preset.presetOptions", {"image": "Not A Ref"}), "inference.preset.presetOptions.image",
     "repository"),
    (INF, _set("inference.config", "My Config"), "inference.config", "DNS-1123"),
    # count: bounded before anything is rendered (the schema's hard cap, then the preset/SKU rule).
    (INF, _set("resource.count", 5000), "resource.count", "hard cap of 1000"),
    (INF, _set("resource.count", 1_000_000), "resource.count", "hard cap of 1000"),
    (INF, _set("resource.count", 17), "resource.count",
     "17 is too many for preset phi-3-mini-4k-instruct on Standard_NC6s_v3: allowed 1 to 16"),
    # Gated presets need the token Secret; the others must not name one.
    (INF, _set("inference.preset", {"name": "meta-llama/Llama-3.1-8B-Instruct"}),
     "inference.preset.presetOptions.modelAccessSecret", "HF_TOKEN"),
    (INF, _set("inference.preset.presetOptions", {"modelAccessSecret": "hf"}),
     "inference.preset.presetOptions.modelAccessSecret", "remove"),
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
    assert any(e.startswith("resource.count: 1 is too few") and "falcon-40b needs 90 GiB" in e
               and "Standard_NC6s_v3 has 16 GiB" in e and "allowed exactly 6" in e for e in errors), errors
    body["metadata"]["annotations"] = {"kaito.sh/bypass-resource-checks": "True"}
    assert admission.validate(body).inference.preset.name == "falcon-40b"
    body["resource"]["count"] = 17  # no SKU rule, but the replica cap still holds
    assert any(e.startswith("resource.count: 17 is too many") and "KAITO_MAX_REPLICAS" in e for e in _errors(body))


def test_single_node_preset_too_big_for_the_sku_names_the_instance_type() -> None:
    body = load_example(INF)
    body["inference"]["preset"]["name"] = "phi-3-medium-4k-instruct"
    body["resource"]["count"] = 2  # two replicas of 16 GiB never hold 28 GiB each
    errors = _errors(body)
    assert any(e.startswith("resource.instanceType:") and "needs 28 GiB" in e and "no distributed inference" in e
               for e in errors), errors


# (preset, SKU, count, max_replicas, None if admitted / words of the resource.count error)
COUNTS = [
    ("falcon-40b", "Standard_NC24ads_A100_v4", 1, 16, "too few for preset falcon-40b on Standard_NC24ads_A100_v4: allowed exactly 2"),
    ("falcon-40b", "Standard_NC24ads_A100_v4", 2, 16, None),
    ("falcon-40b", "Standard_NC24ads_A100_v4", 3, 16, "too many for preset falcon-40b on Standard_NC24ads_A100_v4: allowed exactly 2"),
    ("qwen2.5-coder-32b-instruct", "Standard_NC12s_v3", 2, 16, "allowed exactly 3"),
    ("qwen2.5-coder-32b-instruct", "Standard_NC12s_v3", 3, 16, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 16, 16, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 17, 16, "allowed 1 to 16"),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 4, 4, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 5, 4, "allowed 1 to 4"),
]
COUNT_IDS = [f"{c[0]}-{c[1]}-{c[2]}-max{c[3]}" for c in COUNTS]


def _count_body(preset: str, sku: str, count: int) -> dict[str, Any]:
    body = load_example(INF)
    body["metadata"]["name"] = "counted"
    body["inference"]["preset"]["name"] = preset
    body["resource"].update(instanceType=sku, count=count)
    return body


@pytest.mark.parametrize("preset,sku,count,cap,words", COUNTS, ids=COUNT_IDS)
def test_count_bound_through_the_webhook(preset: str, sku: str, count: int, cap: int, words: str | None) -> None:
    import kopf
    from kaito.operator.handlers import validate_webhook

    body = _count_body(preset, sku, count)
    if words is None:
        validate_webhook(body=body, old=None, operation="CREATE", max_replicas=cap)
        return
    with pytest.raises(kopf.AdmissionError) as info:
        validate_webhook(body=body, old=None, operation="CREATE", max_replicas=cap)
    assert info.value.code == 422 and str(info.value).startswith("resource.count: ") and words in str(info.value)


@pytest.mark.parametrize("preset,sku,count,cap,words", COUNTS, ids=COUNT_IDS)
def test_count_bound_through_operator_render(
    tmp_path: Any, capsys: Any, monkeypatch: Any, preset: str, sku: str, count: int, cap: int, words: str | None
) -> None:
    import yaml
    from kaito.presets.cli import main

    monkeypatch.setenv("KAITO_MAX_REPLICAS", str(cap))
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(_count_body(preset, sku, count)))
    code = main(["operator", "render", str(path)])
    out = capsys.readouterr()
    if words is None:
        assert code == 0, out.err
        kinds = [d["kind"] for d in yaml.safe_load_all(out.out)]
        assert kinds.count("NodeClaim") == count
        workload = "StatefulSet" if count > 1 and get_preset(preset).supports_distributed_inference else "Deployment"
        assert workload in kinds
        return
    assert code == 2 and out.out == "" and out.err.count("\n") == 1, out.err
    assert out.err.startswith("error: ") and "resource.count: " in out.err and words in out.err, out.err


def test_operator_setting_errors_name_the_variable(tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    from kaito.presets.cli import main

    monkeypatch.setenv("KAITO_MAX_REPLICAS", "lots")
    path = tmp_path / "ws.yaml"
    path.write_text(yaml_dump(load_example(INF)))
    assert main(["operator", "render", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KAITO_MAX_REPLICAS='lots'" in err and "integer" in err, err


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
    assert errs and "LoRA must not quantize" in errs[0]
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


def test_name_limit_follows_the_objects_derived_from_it() -> None:
    """63 for a Deployment's Service and labels; 52 when a StatefulSet's revision label adds -<hash>."""
    body = load_example(INF)
    body["metadata"]["name"] = "w" * 63
    admission.validate(body)
    multi = load_example(INF)
    multi["inference"]["preset"]["name"] = "falcon-40b"
    multi["resource"]["count"] = 2
    multi["resource"]["instanceType"] = "Standard_NC24ads_A100_v4"
    multi["metadata"]["name"] = "w" * 52
    assert admission.validate(multi).resource.count == 2
    multi["metadata"]["name"] = "w" * 53
    errors = _errors(multi)
    assert any(e.startswith("metadata.name") and "at most 52" in e and "controller-revision-hash" in e
               for e in errors), errors


def test_huge_counts_are_refused_fast() -> None:
    import time

    body = load_example(INF)
    body["resource"]["count"] = 1_000_000
    start = time.perf_counter()
    assert any(e.startswith("resource.count") for e in _errors(body))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("repo,canonical", [
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
])
def test_hugging_face_repo_names_are_admitted_and_rendered_as_the_preset(repo: str, canonical: str) -> None:
    from kaito.operator.render import render
    from kaito.operator.settings import OperatorSettings

    body = load_example(INF)
    body["resource"]["instanceType"] = "Standard_NC24ads_A100_v4"
    body["inference"]["preset"] = {"name": repo, "presetOptions": {"modelAccessSecret": "hf-token"}}
    if canonical.startswith("phi"):
        del body["inference"]["preset"]["presetOptions"]
    objs = render(admission.validate(body), OperatorSettings(), [])
    dep = next(o for o in objs if o["kind"] == "Deployment")
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--preset") + 1] == canonical


def test_renaming_a_preset_to_its_repo_is_not_a_change() -> None:
    old = load_example(INF)
    new = copy.deepcopy(old)
    new["inference"]["preset"]["name"] = "microsoft/Phi-3-mini-4k-instruct"
    assert admission.validate(new, old).inference is not None


def test_webhook_answers_with_the_fields_never_a_traceback() -> None:
    import kopf
    from kaito.operator.handlers import validate_webhook

    body = load_example(INF)
    body["metadata"] = "x"
    with pytest.raises(kopf.AdmissionError) as info:
        validate_webhook(body=body, old=None, operation="CREATE")
    assert info.value.code == 422 and str(info.value).startswith("metadata:")


@pytest.mark.parametrize("content", [
    b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe\x00",
    b"apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: x\n",
    b"apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: w, annotations: [a]}\nresource: {}\n",
    b"- a\n- b\n",
    b"a: [\n",
    b"---\nkind: Workspace\n---\nkind: Workspace\n",
], ids=["binary", "metadata-string", "annotations-list", "list", "bad-yaml", "two-docs"])
def test_render_cli_reports_bad_files_in_one_line(tmp_path: Any, capsys: Any, content: bytes) -> None:
    from kaito.presets.cli import main

    path = tmp_path / "ws.yaml"
    path.write_bytes(content)
    assert main(["operator", "render", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
