"""training_config.yaml: Kaito's shipped defaults, HF-class field checks, Kaito's rules, one message per bad case."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from kaito.presets.errors import InvalidInput
from kaito.tuning import default_config_path, default_config_text
from kaito.tuning.config import (
    SECTIONS,
    build_lora,
    build_model_kwargs,
    build_quantization,
    build_training_args,
    parse_config,
    resolve_output_dir,
)


def test_defaults_load_without_torch():
    code = (
        "import sys, yaml, kaito.tuning.cli; from kaito.tuning import default_config_text, default_config_path;"
        "docs = [yaml.safe_load(default_config_text(m)) for m in ('lora', 'qlora')];"
        "assert all('training_config' in d for d in docs);"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import';"
        "print(default_config_path('qlora'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("presets/training_configs/qlora.yaml")  # the one home, shared with the operator


def test_seed_qlora_defaults_map_onto_hf_classes(tmp_path):
    import torch

    cfg = parse_config(default_config_path("qlora"), method="qlora", results_root=tmp_path)
    assert cfg.output_dir == tmp_path  # /mnt/results rebased onto the local results root
    q = build_quantization(cfg)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    lora = build_lora(cfg, ["qkv_proj", "o_proj"])
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 8, 0.0)
    assert set(lora.target_modules) == {"qkv_proj", "o_proj"}
    args = build_training_args(cfg)
    assert args.save_strategy == "epoch" and args.per_device_train_batch_size == 1
    assert args.ddp_find_unused_parameters is False and args.output_dir == str(tmp_path)
    kw = build_model_kwargs(cfg, trust_remote_code=False)
    assert kw["dtype"] == torch.bfloat16 and kw["local_files_only"] and kw["device_map"] == "auto"
    assert cfg.dataset.shuffle_dataset and cfg.dataset.shuffle_seed == 42 and not cfg.dataset.packing


def test_lora_default_has_no_quantization(tmp_path):
    cfg = parse_config(default_config_path("lora"), method="lora", results_root=tmp_path)
    assert cfg.quantization is None and build_quantization(cfg) is None


def test_any_hf_field_is_accepted(tmp_path):
    doc = {
        "training_config": {
            "QuantizationConfig": {"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 5.0},
            "LoraConfig": {"r": 4, "use_rslora": True, "bias": "lora_only", "target_modules": ["o_proj"]},
            "TrainingArguments": {"gradient_accumulation_steps": 3, "lr_scheduler_type": "cosine", "max_grad_norm": 0.3},
            "DataCollator": {"pad_to_multiple_of": 8},
            "ModelConfig": {"attn_implementation": "eager", "low_cpu_mem_usage": True},
            "DatasetConfig": {"packing": True, "max_seq_length": 256, "messages_column": "conv"},
        }
    }
    cfg = parse_config(doc, method="qlora", results_root=tmp_path)
    assert build_lora(cfg, []).use_rslora is True
    assert build_training_args(cfg).gradient_accumulation_steps == 3
    assert build_quantization(cfg).llm_int8_threshold == 5.0
    assert cfg.dataset.packing and cfg.collator == {"pad_to_multiple_of": 8}


def test_configmap_manifest_is_accepted(tmp_path):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
          "data": {"training_config.yaml": default_config_text("lora")}}
    p = tmp_path / "cm.yaml"
    p.write_text(yaml.safe_dump(cm))
    assert parse_config(p, method="lora", results_root=tmp_path).lora["r"] == 8


def _cfg(**sections):
    return {"training_config": sections}


INVALID = [
    ("lora", {"top": 1}, "top-level key 'training_config' is missing"),
    ("lora", {"training_config": {}, "extra": 1}, "unknown top-level keys ['extra']"),
    ("lora", _cfg(LoRAConfig={}), "training_config.LoRAConfig: unknown section; did you mean LoraConfig? (valid: "
     + ", ".join(SECTIONS)),
    ("lora", _cfg(Misc={}), "unknown section (valid: ModelConfig, QuantizationConfig"),
    ("lora", _cfg(LoraConfig=[1]), "training_config.LoraConfig must be a mapping"),
    ("lora", _cfg(LoraConfig={"lora_alph": 8}), "training_config.LoraConfig.lora_alph: not a field of peft.LoraConfig; did you mean lora_alpha"),
    ("lora", _cfg(LoraConfig={"rank": 8}), "training_config.LoraConfig.rank: not a field of peft.LoraConfig (valid: "),
    ("lora", _cfg(TrainingArguments={"learning_rat": 1}),
     "training_config.TrainingArguments.learning_rat: not a field of trl.SFTConfig; did you mean learning_rate"),
    ("qlora", _cfg(QuantizationConfig={"load_in_4bit": True, "bnb_4bit_quant": "nf4"}),
     "training_config.QuantizationConfig.bnb_4bit_quant: not a field of transformers.BitsAndBytesConfig"),
    ("lora", _cfg(ModelConfig={"hidden_size": 8}), "training_config.ModelConfig.hidden_size: not a field of from_pretrained"),
    ("lora", _cfg(DataCollator={"mlm_prob": 0.1}), "training_config.DataCollator.mlm_prob: not a field of DataCollatorForLanguageModeling"),
    ("lora", _cfg(DatasetConfig={"shuffle": True}), "training_config.DatasetConfig.shuffle: Extra inputs are not permitted"),
    ("lora", _cfg(DatasetConfig={"train_test_split": 1.5}), "training_config.DatasetConfig.train_test_split: Input should be less than or equal to 1"),
    ("lora", _cfg(QuantizationConfig={"load_in_4bit": True}), "training_config.QuantizationConfig.load_in_4bit is true but method is lora"),
    ("lora", _cfg(QuantizationConfig={"load_in_8bit": True}), "training_config.QuantizationConfig.load_in_8bit is true but method is lora"),
    ("qlora", _cfg(LoraConfig={"r": 8}), "training_config.QuantizationConfig.load_in_4bit (or load_in_8bit) must be true for method qlora"),
    ("qlora", _cfg(QuantizationConfig={"load_in_4bit": False}), "must be true for method qlora"),
    ("qlora", _cfg(QuantizationConfig={"load_in_4bit": True, "load_in_8bit": True}), "set only one of load_in_4bit and load_in_8bit"),
    ("lora", _cfg(TrainingArguments={"output_dir": "/tmp/elsewhere"}),
     "training_config.TrainingArguments.output_dir '/tmp/elsewhere' is outside the results root"),
    ("lora", _cfg(TrainingArguments={"output_dir": "../up"}), "training_config.TrainingArguments.output_dir '../up' escapes"),
    ("sft", _cfg(), "--method 'sft' is not one of lora, qlora"),
]


@pytest.mark.parametrize("method,doc,message", INVALID, ids=[m[:40] for _, _, m in INVALID])
def test_invalid_config_names_the_field(tmp_path, method, doc, message):
    with pytest.raises(InvalidInput) as e:
        parse_config(doc, method=method, results_root=tmp_path / "results")
    assert message in str(e.value)


BUILD_INVALID = [
    ("TrainingArguments", {"save_strategy": "sometimes"}, "training_config.TrainingArguments:"),
    ("ModelConfig", {"torch_dtype": "float99"}, "training_config.ModelConfig.torch_dtype: 'float99' is not a torch dtype"),
    ("ModelConfig", {"trust_remote_code": True}, "training_config.ModelConfig.trust_remote_code is true but this preset"),
    ("QuantizationConfig", {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int99"},
     "training_config.QuantizationConfig.bnb_4bit_compute_dtype: 'int99' is not a torch dtype"),
    ("LoraConfig", {"layers_pattern": "x"}, "training_config.LoraConfig: When `layers_pattern` is specified"),
    ("LoraConfig", {"r": 0}, "training_config.LoraConfig.r must be a positive integer"),
    ("LoraConfig", {"lora_dropout": 1.5}, "training_config.LoraConfig.lora_dropout must be in [0, 1)"),
]


@pytest.mark.parametrize("section,fields,message", BUILD_INVALID, ids=[m[:40] for _, _, m in BUILD_INVALID])
def test_invalid_values_name_the_section(tmp_path, section, fields, message):
    method = "qlora" if section == "QuantizationConfig" else "lora"
    cfg = parse_config(_cfg(**{section: fields}), method=method, results_root=tmp_path)
    with pytest.raises(InvalidInput) as e:
        {"TrainingArguments": build_training_args, "QuantizationConfig": build_quantization,
         "LoraConfig": lambda c: build_lora(c, ["o_proj"]),
         "ModelConfig": lambda c: build_model_kwargs(c, trust_remote_code=False)}[section](cfg)
    assert message in str(e.value)


def test_output_dir_rules(tmp_path):
    root = tmp_path / "r"
    assert resolve_output_dir("/mnt/results/run1", root) == root / "run1"
    assert resolve_output_dir("sub", root) == root / "sub"
    assert resolve_output_dir(str(root / "x"), root) == root / "x"
    assert resolve_output_dir(None, root) == root


def test_missing_config_file(tmp_path):
    with pytest.raises(InvalidInput, match="--config .*nope.yaml: no such file"):
        parse_config(tmp_path / "nope.yaml", method="lora", results_root=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_config: [unclosed")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        parse_config(bad, method="lora", results_root=tmp_path)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_operator_configmap_is_the_tuning_default(tmp_path, method):
    """Seam: the ConfigMap the operator renders for a Workspace without tuning.config is the job's own default."""
    from pathlib import Path

    from kaito.operator import render
    from kaito.operator.settings import OperatorSettings

    ws = yaml.safe_load((Path(__file__).parents[2] / "deploy/examples/workspace-tuning-phi-3.yaml").read_text())
    ws["tuning"]["method"] = method
    ws["metadata"].update({"namespace": "default", "uid": "1234"})
    objs = render.render(ws, OperatorSettings(), [])
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    (job,) = [o for o in objs if o["kind"] == "Job"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    mount = command[command.index("--config") + 1]
    assert mount == "/mnt/config/" + next(iter(cm["data"]))  # the Job reads the key the ConfigMap holds
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump(cm))
    rendered = parse_config(manifest, method=method, results_root=tmp_path)
    assert rendered == parse_config(default_config_path(method), method=method, results_root=tmp_path)
    assert cm["data"]["training_config.yaml"] == default_config_text(method)


@pytest.mark.parametrize("data, expected", [
    ({"training_config.yaml": "training_config: [unclosed"}, "ConfigMap data training_config.yaml: not valid YAML"),
    ({"training_config.yaml": "- 1"}, "ConfigMap data training_config.yaml: the top level must be a mapping"),
    ({"other.yaml": "x: 1"}, "ConfigMap has no data key training_config.yaml"),
    ("not a mapping", "ConfigMap has no data key training_config.yaml"),
])
def test_a_configmap_with_a_bad_data_key_is_refused_naming_it(tmp_path, data, expected):
    p = tmp_path / "cm.yaml"
    p.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "data": data}))
    with pytest.raises(InvalidInput, match=f"--config {p}: {expected}"):
        parse_config(p, method="lora", results_root=tmp_path)
