"""SKU tables and Kaito's three fit rules."""

import pytest

from kaito.presets import InvalidInput, fit, get_preset, get_sku, sku_table, smallest_fit
from kaito.presets.skus import count_problem, count_range

SPEC_SKUS = {
    "Standard_NC6s_v3": (1, 16, "V100"),
    "Standard_NC24ads_A100_v4": (1, 80, "A100"),
    "Standard_NC48ads_A100_v4": (2, 160, "A100"),
    "Standard_NC96ads_A100_v4": (4, 320, "A100"),
    "Standard_ND96asr_A100_v4": (8, 320, "A100"),
    "Standard_ND96amsr_A100_v4": (8, 640, "A100"),
    "Standard_NC40ads_H100_v5": (1, 94, "H100"),
    "Standard_ND96isr_H100_v5": (8, 640, "H100"),
    "Standard_ND96isr_H200_v5": (8, 1128, "H200"),
    "Standard_NC4as_T4_v3": (1, 16, "T4"),
    "Standard_NC64as_T4_v3": (4, 64, "T4"),
    "p4d.24xlarge": (8, 320, "A100"),
    "g6.12xlarge": (4, 96, "L4"),
}


@pytest.mark.parametrize("name", sorted(SPEC_SKUS))
def test_spec_skus(name):
    sku = get_sku(name)
    assert (sku.gpus, sku.gpu_memory_gib, sku.gpu_model) == SPEC_SKUS[name]


def test_tables_cover_both_clouds():
    clouds = {s.cloud for s in sku_table().values()}
    assert clouds == {"azure", "aws"}
    assert all(s.gpus >= 1 and s.gpu_memory_gib > 0 for s in sku_table().values())


def test_phi3_mini_fits_nc6s_v3():
    r = fit(get_preset("phi-3-mini-4k-instruct"), "Standard_NC6s_v3", 1)
    assert r.ok and bool(r)


def test_falcon_40b_rejected_on_nc6s_v3_names_rule():
    r = fit(get_preset("falcon-40b-instruct"), "Standard_NC6s_v3", 1)
    assert not r.ok
    assert r.rule == "gpu-count"
    assert "gives 1 GPU(s)" in r.message and "needs 2" in r.message
    assert r.alternatives and all(fit(get_preset("falcon-40b-instruct"), a).ok for a in r.alternatives)


def test_total_memory_rule_with_numbers():
    # 2 x NC6s_v3 = 2 GPUs (count rule passes) but 32 GiB < 90 GiB.
    r = fit(get_preset("falcon-40b-instruct"), "Standard_NC6s_v3", 2)
    assert r.rule == "total-gpu-memory" and "32 GiB" in r.message and "90 GiB" in r.message


def test_per_gpu_memory_rule():
    from kaito.presets import GPURequirements, PresetSpec

    p = PresetSpec(
        name="big-gpu", family="t", hf_repo="o/m", hf_revision="0" * 40, image_tag="1",
        gpu=GPURequirements(gpu_count=1, total_gpu_memory_gib=10, per_gpu_memory_gib=40),
    )
    r = fit(p, "Standard_NC64as_T4_v3")
    assert r.rule == "per-gpu-memory" and "16 GiB per GPU" in r.message and "needs 40" in r.message


def test_count_scales_memory_only_for_distributed_presets():
    # falcon-40b is split over its nodes: 2 x 80 GiB hold its 90 GiB.
    assert fit(get_preset("falcon-40b"), "Standard_NC24ads_A100_v4", 2).ok
    assert not fit(get_preset("falcon-40b"), "Standard_NC24ads_A100_v4", 1).ok
    # phi-3-medium runs whole on every node: two 16 GiB replicas never hold its 28 GiB.
    r = fit(get_preset("phi-3-medium-4k-instruct"), "Standard_NC6s_v3", 2)
    assert not r.ok and r.rule == "total-gpu-memory"


# (preset, SKU, count, max_replicas, None if allowed / words of the refusal)
COUNT_CASES = [
    ("falcon-40b", "Standard_NC24ads_A100_v4", 1, 16, "1 is too few for preset falcon-40b on Standard_NC24ads_A100_v4: allowed exactly 2"),
    ("falcon-40b", "Standard_NC24ads_A100_v4", 2, 16, None),
    ("falcon-40b", "Standard_NC24ads_A100_v4", 3, 16, "3 is too many for preset falcon-40b on Standard_NC24ads_A100_v4: allowed exactly 2"),
    ("falcon-40b", "Standard_NC6s_v3", 5, 16, "too few for preset falcon-40b on Standard_NC6s_v3: allowed exactly 6"),
    ("falcon-40b", "Standard_NC6s_v3", 6, 16, None),
    ("falcon-40b", "Standard_NC6s_v3", 7, 16, "allowed exactly 6"),
    ("falcon-40b", "Standard_NC96ads_A100_v4", 1, 16, None),
    ("falcon-40b", "Standard_NC96ads_A100_v4", 2, 16, "too many for preset falcon-40b on Standard_NC96ads_A100_v4: allowed exactly 1"),
    ("falcon-40b-instruct", "p4d.24xlarge", 1, 16, None),
    ("qwen2.5-coder-32b-instruct", "Standard_NC24ads_A100_v4", 1, 16, None),
    ("qwen2.5-coder-32b-instruct", "Standard_NC12s_v3", 2, 16, "too few for preset qwen2.5-coder-32b-instruct on Standard_NC12s_v3: allowed exactly 3"),
    ("qwen2.5-coder-32b-instruct", "Standard_NC12s_v3", 3, 16, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 1, 16, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 16, 16, None),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 17, 16, "17 is too many for preset phi-3-mini-4k-instruct on Standard_NC6s_v3: allowed 1 to 16"),
    ("phi-3-mini-4k-instruct", "Standard_NC6s_v3", 5, 4, "KAITO_MAX_REPLICAS (4)"),
    ("tiny-phi-3", "g5.xlarge", 3, 16, None),
]


@pytest.mark.parametrize("preset,sku,count,cap,words", COUNT_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COUNT_CASES])
def test_count_range_from_preset_and_sku(preset, sku, count, cap, words):
    problem = count_problem(get_preset(preset), get_sku(sku), count, cap)
    if words is None:
        assert problem is None
    else:
        assert problem is not None and words in problem, problem
        r = count_range(get_preset(preset), get_sku(sku), cap)
        assert not r.minimum <= count <= r.maximum


def test_no_count_serves_a_single_node_preset_bigger_than_the_node():
    with pytest.raises(InvalidInput) as e:
        count_range(get_preset("phi-3-medium-4k-instruct"), get_sku("Standard_NC6s_v3"))
    msg = str(e.value)
    assert "phi-3-medium-4k-instruct needs 28 GiB" in msg and "Standard_NC6s_v3 has 16 GiB" in msg
    assert "no distributed inference" in msg and "Standard_NC12s_v3" in msg  # a SKU that holds it


def test_unknown_sku_lists_supported():
    with pytest.raises(InvalidInput) as e:
        get_sku("Standard_Nope")
    assert "Standard_NC6s_v3" in str(e.value) and "p4d.24xlarge" in str(e.value)


def test_case_insensitive_azure_names():
    assert get_sku("standard_nc6s_v3").name == "Standard_NC6s_v3"


def test_smallest_fit():
    assert smallest_fit(get_preset("phi-3-mini-4k-instruct")).gpu_memory_gib == 16
    s = smallest_fit(get_preset("falcon-40b"))
    assert s.gpus >= 2 and s.gpu_memory_gib >= 90
    assert smallest_fit(get_preset("falcon-40b"), cloud="aws").cloud == "aws"
