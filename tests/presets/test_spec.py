"""The preset contract's shared rules: Kaito's quantization rule for lora and qlora."""

import pytest
import yaml

from kaito.presets.spec import quantization_problem

CASES = [
    ("lora", None, None),
    ("lora", {}, None),
    ("lora", {"load_in_4bit": False}, None),
    ("lora", {"load_in_4bit": True}, "QuantizationConfig.load_in_4bit is true but method is lora"),
    ("lora", {"load_in_8bit": True}, "QuantizationConfig.load_in_8bit is true but method is lora"),
    ("qlora", {"load_in_4bit": True}, None),
    ("qlora", {"load_in_8bit": True}, None),
    ("qlora", None, "load_in_4bit (or load_in_8bit) must be true for method qlora"),
    ("qlora", {"bnb_4bit_quant_type": "nf4"}, "must be true for method qlora"),
    ("qlora", {"load_in_4bit": True, "load_in_8bit": True}, "set only one of load_in_4bit and load_in_8bit"),
]


@pytest.mark.parametrize("method,quant,words", CASES)
def test_quantization_rule(method, quant, words):
    problem = quantization_problem(method, quant)
    if words is None:
        assert problem is None
    else:
        assert problem is not None and words in problem and problem.startswith("training_config.QuantizationConfig")


def test_operator_and_tuning_share_the_rule(tmp_path):
    """Both callers give the same words for the same config (the seam crossed)."""
    from kaito.operator.admission import check_training_config
    from kaito.presets.errors import InvalidInput
    from kaito.tuning.config import parse_config

    text = "training_config:\n  QuantizationConfig: {load_in_8bit: true}\n"
    [admitted] = check_training_config("lora", text)
    with pytest.raises(InvalidInput) as info:
        parse_config(yaml.safe_load(text), method="lora", results_root=str(tmp_path))
    assert admitted == f"tuning.config: {info.value}"
