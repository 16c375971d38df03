"""The preset catalog: numbers equal the spec table, validation messages are clear."""

from pathlib import Path

import pytest

from kaito.presets import InvalidInput, PresetRegistry, UnknownPreset, get_preset, kaito_disk_gib, list_presets
from kaito.presets.registry import CATALOG_DIR, VALID_KEYS, default_registry, reset_default_registry

# name: (disk GiB, GPUs, total GiB, per-GPU GiB, tuning methods -> GiB) from kaito-reference.md section 3.
SPEC_TABLE = {
    "phi-3-mini-4k-instruct": (80, 1, 9, 0, {"lora": 72, "qlora": 72}),
    "phi-3-mini-128k-instruct": (80, 1, 9, 0, {"lora": 72, "qlora": 72}),
    "phi-3-medium-4k-instruct": (120, 1, 28, 0, {"lora": 80, "qlora": 80}),
    "phi-3-medium-128k-instruct": (120, 1, 28, 0, {"lora": 80, "qlora": 80}),
    "phi-3.5-mini-instruct": (70, 1, 8, 0, {"lora": 72, "qlora": 72}),
    "phi-4": (150, 1, 40, 0, {"lora": 70, "qlora": 70}),
    "phi-4-mini-instruct": (70, 1, 8, 0, {"lora": 72, "qlora": 72}),
    "falcon-7b": (90, 1, 14, 0, {"qlora": 16}),
    "falcon-7b-instruct": (90, 1, 14, 0, {}),
    "falcon-40b": (280, 2, 90, 0, {"lora": 90, "qlora": 90}),
    "falcon-40b-instruct": (280, 2, 90, 0, {"lora": 90, "qlora": 90}),
    "mistral-7b": (90, 1, 14, 0, {"lora": 16, "qlora": 16}),
    "mistral-7b-instruct": (90, 1, 16, 0, {}),
    "llama-3.1-8b-instruct": (110, 1, 22, 0, {}),
    "qwen2.5-coder-7b-instruct": (110, 1, 24, 0, {"lora": 24, "qlora": 24}),
    "qwen2.5-coder-32b-instruct": (230, 1, 70, 0, {"lora": 140, "qlora": 140}),
    "deepseek-r1-distill-llama-8b": (90, 1, 16.5, 0, {}),
    "deepseek-r1-distill-qwen-14b": (120, 1, 25.7, 0, {}),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_catalog_numbers_equal_spec_table(name):
    disk, gpus, total, per_gpu, tuning = SPEC_TABLE[name]
    p = get_preset(name)
    assert p.disk == disk
    assert p.gpu.gpu_count == gpus
    assert p.gpu.total_gpu_memory_gib == total
    assert p.gpu.per_gpu_memory_gib == per_gpu
    assert {m.value: v for m, v in p.tuning_memory_gib.items()} == tuning
    assert len(p.hf_revision) == 40 and "/" in p.hf_repo
    # Kaito's disk rule reproduces every row of the table.
    assert kaito_disk_gib(total) == disk


def test_catalog_is_exactly_spec_plus_embedded():
    names = {p.name for p in list_presets()}
    assert names == set(SPEC_TABLE) | {"tiny-phi-3", "tiny-phi-3-small"}


def test_kaito_specifics():
    assert get_preset("phi-3-mini-4k-instruct").dtype == "auto"
    assert get_preset("falcon-7b").dtype == "bfloat16"
    assert get_preset("llama-3.1-8b-instruct").download_at_runtime
    assert get_preset("phi-3-mini-4k-instruct").image_ref("mcr.microsoft.com/aks/kaito") == (
        "mcr.microsoft.com/aks/kaito/kaito-phi-3-mini-4k-instruct:0.1.1"
    )
    assert get_preset("tiny-phi-3").embedded == "tiny"
    assert get_preset("tiny-phi-3-small").embedded == "small"
    assert not get_preset("tiny-phi-3").trust_remote_code


def test_alias_resolves():
    assert get_preset("phi-3-mini").name == "phi-3-mini-4k-instruct"
    assert "phi-3-mini" in default_registry()


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownPreset) as e:
        get_preset("phi-3-mini-4k-instrct")
    assert "did you mean phi-3-mini-4k-instruct" in str(e.value)


def _write(tmp: Path, name: str, body: str) -> Path:
    p = tmp / name
    p.write_text(body)
    return p


GOOD = """
family: test
presets:
  - name: {name}
    hf_repo: org/model
    hf_revision: 0123456789abcdef0123456789abcdef01234567
    image_tag: "0.0.1"
    gpu: {{total_gpu_memory_gib: 4}}
"""


def test_unknown_key_rejected_with_valid_keys(tmp_path):
    f = _write(tmp_path, "bad.yaml", GOOD.format(name="m1") + "    gpu_memroy: 3\n")
    with pytest.raises(InvalidInput) as e:
        PresetRegistry().load_file(f)
    msg = str(e.value)
    assert "unknown key 'gpu_memroy'" in msg and "bad.yaml" in msg and "'m1'" in msg
    assert "valid keys are: " + ", ".join(VALID_KEYS) in msg


def test_unknown_nested_key_names_nested_keys(tmp_path):
    f = _write(tmp_path, "bad.yaml", GOOD.format(name="m1").replace("{total_gpu_memory_gib: 4}", "{total: 4}"))
    with pytest.raises(InvalidInput) as e:
        PresetRegistry().load_file(f)
    assert "unknown key 'gpu.total'" in str(e.value) and "total_gpu_memory_gib" in str(e.value)


def test_duplicate_name_names_both_files(tmp_path):
    a = _write(tmp_path, "a.yaml", GOOD.format(name="dup"))
    b = _write(tmp_path, "b.yaml", GOOD.format(name="dup"))
    reg = PresetRegistry()
    reg.load_file(a)
    with pytest.raises(InvalidInput) as e:
        reg.load_file(b)
    assert str(a) in str(e.value) and str(b) in str(e.value) and "'dup'" in str(e.value)


def test_duplicate_of_shipped_catalog_is_refused(tmp_path, monkeypatch):
    _write(tmp_path, "mine.yaml", GOOD.format(name="phi-3-mini"))  # collides with an alias
    monkeypatch.setenv("KAITO_PRESET_PATH", str(tmp_path))
    reset_default_registry()
    try:
        with pytest.raises(InvalidInput) as e:
            default_registry()
        assert "phi3.yaml" in str(e.value) and "mine.yaml" in str(e.value)
    finally:
        monkeypatch.delenv("KAITO_PRESET_PATH")
        reset_default_registry()


@pytest.mark.parametrize(
    "bad_name", ["Phi-3", "phi_3", "-phi", "phi-", "a" * 64, "phi 3"]
)
def test_names_must_be_dns1123(tmp_path, bad_name):
    f = _write(tmp_path, "n.yaml", GOOD.format(name=f'"{bad_name}"'))
    with pytest.raises(InvalidInput, match="DNS-1123"):
        PresetRegistry().load_file(f)


def test_revision_must_be_pinned(tmp_path):
    f = _write(tmp_path, "r.yaml", GOOD.format(name="m").replace("0123456789abcdef0123456789abcdef01234567", "main"))
    with pytest.raises(InvalidInput, match="hf_revision must be a pinned 40-hex commit"):
        PresetRegistry().load_file(f)


def test_unknown_top_level_key(tmp_path):
    f = _write(tmp_path, "t.yaml", "famly: x\npresets: []\n")
    with pytest.raises(InvalidInput, match="unknown top-level key"):
        PresetRegistry().load_file(f)


def test_every_catalog_file_is_a_family():
    files = sorted(p.name for p in CATALOG_DIR.glob("*.yaml"))
    assert {"phi3.yaml", "falcon.yaml", "mistral.yaml", "llama.yaml", "qwen.yaml", "deepseek.yaml", "tiny.yaml"} <= set(files)


@pytest.mark.parametrize("repo,name", [
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),  # as the hub spells it
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("META-LLAMA/llama-3.1-8b-instruct", "llama-3.1-8b-instruct"),  # hub repo ids ignore case
    ("microsoft/phi-4", "phi-4"),
])
def test_hugging_face_repo_ids_resolve_to_the_preset(repo, name):
    assert get_preset(repo).name == name
    assert default_registry().resolve(repo) == name and repo in default_registry()


def test_every_catalog_repo_resolves_to_its_own_preset():
    for p in list_presets():
        if p.hf_repo:
            assert get_preset(p.hf_repo) is p


def test_unknown_repo_suggests_close_repos():
    with pytest.raises(UnknownPreset, match="microsoft/Phi-3-mini-4k-instruct"):
        get_preset("microsoft/Phi-3-mini-4k-instruc")


def test_two_presets_claiming_one_repo_are_refused(tmp_path):
    body = GOOD.format(name="m1") + GOOD.format(name="m2").split("presets:\n", 1)[1].replace("org/model", "Org/Model")
    f = _write(tmp_path, "dup.yaml", body)
    with pytest.raises(InvalidInput, match="duplicate hf_repo 'Org/Model'.*m1.*m2"):
        PresetRegistry().load_file(f)
