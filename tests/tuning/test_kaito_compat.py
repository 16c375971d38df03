"""Kaito's own training configs and every field its tuning parser accepts: parsed here, with the same effect.

The configs in data/ are copied verbatim from Kaito's public repository (the
Helm chart's lora-params / qlora-params templates and the phi-3 fine-tuning
example); each file names its source. Effects are checked on the features
the trainer feeds the model (tiny tokenizer, no training) except for one
short run of Kaito's LoRA template through the `kaito` CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kaito.presets import get_preset
from kaito.presets.errors import InvalidInput
from kaito.tuning.compat import SFT_FIELDS
from kaito.tuning.config import build_lora, build_quantization, build_training_args, parse_config
from kaito.tuning.data import IGNORE, Collator, build_features
from kaito.tuning.trainer import load_tokenizer, max_sequence_length
from tuning_datagen import write_parquet

DATA = Path(__file__).parent / "data"
SAMPLES = [("kaito-lora-params.yaml", "lora"), ("kaito-qlora-params.yaml", "qlora"),
           ("kaito_configmap_tuning_phi_3.yaml", "qlora")]
SPEC = get_preset("tiny-phi-3")


def kaito_sample(name: str) -> dict:
    """The training_config of a Kaito sample ConfigMap, its Helm placeholder filled as `helm template` would."""
    text = (DATA / name).read_text().replace("{{ .Release.Namespace }}", "default")
    return yaml.safe_load(yaml.safe_load(text)["data"]["training_config.yaml"])


def ours(caplog) -> list[str]:
    """Warnings of the tuning job (libraries such as bitsandbytes log their own)."""
    return [r.getMessage() for r in caplog.records if r.name == "kaito.tuning" and r.levelno >= logging.WARNING]


def cfg_with(tmp_path, method="lora", **sections):
    return parse_config({"training_config": sections}, method=method, results_root=tmp_path / "results")


def features(cfg, model_dir, data_dir):
    tok = load_tokenizer(cfg, SPEC, model_dir)
    return tok, build_features(tok, data_dir, cfg.dataset, max_sequence_length(cfg, SPEC, tok))


@pytest.fixture
def text_data(tmp_path) -> Path:
    """Rows with two text columns and no chat format: a long `body` and a short `note`."""
    rows = [{"body": f"row {i} " + "alpha beta gamma delta " * (4 + i % 5), "note": f"note {i}"} for i in range(12)]
    return write_parquet(tmp_path / "text" / "train.parquet", rows).parent


@pytest.mark.parametrize("name,method", SAMPLES)
def test_kaito_sample_configs_run_unchanged(tmp_path, name, method, caplog):
    """Kaito's chart templates and its phi-3 example parse and build every HF object; nothing is ignored."""
    with caplog.at_level(logging.WARNING, logger="kaito.tuning"):
        cfg = parse_config(kaito_sample(name), method=method, results_root=tmp_path)
    assert cfg.ignored == [] and not ours(caplog)
    assert cfg.output_dir == tmp_path and cfg.dataset.shuffle_dataset and cfg.dataset.train_test_split == 1
    assert (build_quantization(cfg) is not None) is (method == "qlora")
    args = build_training_args(cfg)
    lora = build_lora(cfg, SPEC.lora_target_modules)
    if name.startswith("kaito_configmap"):
        assert args.per_device_train_batch_size == 2 and args.save_strategy == "epoch"
        assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    else:
        assert args.save_strategy == "no" and set(lora.target_modules) == set(SPEC.lora_target_modules)


# Every field of Kaito's cli.py dataclasses (ModelConfig, QuantizationConfig, ExtLoraConfig,
# DatasetConfig, ExtDataCollator), at Kaito's default values.
KAITO_FIELDS = {
    "ModelConfig": {
        "pretrained_model_name_or_path": "/workspace/tfs/weights", "state_dict": None, "cache_dir": None,
        "force_download": False, "proxies": None, "output_loading_info": False, "local_files_only": True,
        "revision": "main", "trust_remote_code": False, "torch_dtype": "float32", "device_map": "auto",
        "chat_template": None,
    },
    "QuantizationConfig": {
        "quant_method": "bitsandbytes", "load_in_8bit": False, "load_in_4bit": False, "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
    },
    "LoraConfig": {"init_lora_weights": True, "target_modules": ["o_proj"], "layers_to_transform": None,
                   "layers_pattern": None, "loftq_config": {}},
    "DatasetConfig": {"dataset_path": None, "dataset_extension": None, "shuffle_dataset": True, "shuffle_seed": 42,
                      "context_column": None, "response_column": "text", "messages_column": None,
                      "train_test_split": 0.8},
    "DataCollator": {"tokenizer": None, "mlm": True, "mlm_probability": 0.15, "pad_to_multiple_of": None},
}


def test_every_field_of_kaitos_parser_parses(tmp_path, caplog):
    trl = pytest.importorskip("trl", reason="trl (kaito[dev]) names the SFTConfig fields Kaito accepts")
    from transformers import TrainingArguments

    sft_only = {f.name: f for f in dataclasses.fields(trl.SFTConfig)
                if f.init and f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}}
    assert set(sft_only) <= SFT_FIELDS, f"trl SFTConfig fields without a meaning here: {set(sft_only) - SFT_FIELDS}"
    training = {n: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for n, f in sft_only.items()}
    with caplog.at_level(logging.WARNING, logger="kaito.tuning"):
        cfg = cfg_with(tmp_path, TrainingArguments={**training, "output_dir": "/mnt/results"}, **KAITO_FIELDS)
    assert cfg.ignored == [] and not ours(caplog)  # Kaito's defaults change nothing: no warning
    assert cfg.dataset.max_seq_length == training["max_length"] and cfg.dataset.packing is False
    assert cfg.dataset.dataset_text_field == "text" and cfg.dataset.train_test_split == 0.8


def test_fields_without_effect_get_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kaito.tuning"):
        cfg = cfg_with(tmp_path, method="qlora",
                       ModelConfig={"proxies": "http://proxy:3128", "state_dict": None},
                       QuantizationConfig={"load_in_4bit": True, "quant_method": "gptq"},
                       TrainingArguments={"dataset_num_proc": 4, "loss_type": "dft", "padding_free": False})
    assert cfg.ignored == ["ModelConfig.proxies", "TrainingArguments.dataset_num_proc",
                           "TrainingArguments.loss_type=dft", "QuantizationConfig.quant_method=gptq"]
    assert len(ours(caplog)) == 1
    assert all(name in ours(caplog)[0] for name in cfg.ignored)
    assert build_quantization(cfg).load_in_4bit  # quant_method never reaches BitsAndBytesConfig


@pytest.mark.parametrize("sections,message", [
    ({"TrainingArguments": {"packingg": True}}, "TrainingArguments.packingg: not a field of trl.SFTConfig; did you mean packing"),
    ({"TrainingArguments": {"packing": True}, "DatasetConfig": {"packing": False}},
     "training_config.TrainingArguments.packing (True) and training_config.DatasetConfig.packing (False)"),
    ({"DatasetConfig": {"dataset_extension": "webdataset"}}, "DatasetConfig.dataset_extension: 'webdataset' cannot be read here"),
    ({"ModelConfig": {"chat_template": "/nowhere/phi-3.jinja"}},
     "training_config.ModelConfig.chat_template: '/nowhere/phi-3.jinja' is no file here"),
    ({"TrainingArguments": {"pad_to_multiple_of": "eight"}}, "TrainingArguments.pad_to_multiple_of: 'eight' is not"),
    ({"TrainingArguments": {"max_length": 4}}, "training_config.TrainingArguments.max_length: Input should be greater than 8"),
    ({"TrainingArguments": {"packing": "sometimes"}}, "training_config.TrainingArguments.packing: Input should be a valid boolean"),
])
def test_bad_kaito_fields_name_the_field(tmp_path, sections, message):
    with pytest.raises(InvalidInput) as e:
        cfg_with(tmp_path, **sections)
    assert message in str(e.value)


def test_max_length_truncates_and_dataset_text_field_picks_the_column(tmp_path, tiny_model_dir, text_data):
    with pytest.raises(InvalidInput, match="no known format in columns \\['body', 'note'\\]"):
        features(cfg_with(tmp_path), tiny_model_dir, text_data)
    cfg = cfg_with(tmp_path, TrainingArguments={"dataset_text_field": "body"}, DatasetConfig={"shuffle_dataset": False})
    tok, (full, _) = features(cfg, tiny_model_dir, text_data)
    assert tok.decode(full[0]["input_ids"]).startswith("row 0 alpha beta")
    assert max(len(r["input_ids"]) for r in full) > 16
    cut = cfg_with(tmp_path, TrainingArguments={"dataset_text_field": "note", "max_length": 16})
    _, (rows, _) = features(cut, tiny_model_dir, text_data)
    assert all(tok.decode(r["input_ids"]).startswith("note ") for r in rows)
    cut = cfg_with(tmp_path, TrainingArguments={"dataset_text_field": "body", "max_length": 16})
    _, (rows, _) = features(cut, tiny_model_dir, text_data)
    assert len(rows) == 12 and all(len(r["input_ids"]) == 16 for r in rows)  # every body is longer: all cut


def test_packing_changes_the_batch_shape(tmp_path, tiny_model_dir):
    write_parquet(tmp_path / "d" / "train.parquet", [{"text": f"short row number {i}"} for i in range(16)])
    shapes = {}
    for packing in (False, True):
        cfg = cfg_with(tmp_path, TrainingArguments={"packing": packing, "max_length": 64})
        tok, (rows, _) = features(cfg, tiny_model_dir, tmp_path / "d")
        batch = Collator(tok.pad_token_id)(rows[:4])
        shapes[packing] = (len(rows), tuple(batch["input_ids"].shape), "position_ids" in batch)
    assert shapes[False][0] == 16 and not shapes[False][2]
    assert shapes[True][0] < 16 / 2 and shapes[True][2]  # several examples per row, positions restart per example
    assert shapes[True][1][1] > shapes[False][1][1]


def test_eval_packing_and_completion_only_loss(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"question {i} about things", "completion": f"answer {i}"} for i in range(20)]
    write_parquet(tmp_path / "pc" / "train.parquet", rows)
    cfg = cfg_with(tmp_path, TrainingArguments={"packing": True, "eval_packing": False},
                   DatasetConfig={"train_test_split": 0.5})
    _, (train, evals) = features(cfg, tiny_model_dir, tmp_path / "pc")
    assert "position_ids" in train[0] and len(evals) == 10 and "position_ids" not in evals[0]

    def targets(**training) -> int:
        c = cfg_with(tmp_path, TrainingArguments=training, DatasetConfig={"shuffle_dataset": False})
        _, (feats, _) = features(c, tiny_model_dir, tmp_path / "pc")
        return sum(x != IGNORE for f in feats for x in f["labels"])

    assert targets(completion_only_loss=False) > targets() == targets(completion_only_loss=True)


def test_chat_template_overrides_the_tokenizers(tmp_path, tiny_model_dir, dolly_parquet):
    inline = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\\n{% endfor %}"  # Kaito's one-line form
    template_file = tmp_path / "plain.jinja"
    template_file.write_text(inline.replace("\\n", "\n"))
    for sections in ({"ModelConfig": {"chat_template": inline}},
                     {"ModelConfig": {"chat_template": str(template_file)}},
                     {"TrainingArguments": {"chat_template_path": str(template_file)}}):
        cfg = cfg_with(tmp_path, **sections)
        tok, (rows, _) = features(cfg, tiny_model_dir, dolly_parquet.parent)
        text = tok.decode(rows[0]["input_ids"])
        assert "<<assistant>>" in text and "<|assistant|>" not in text, sections
    _, (rows, _) = features(cfg_with(tmp_path), tiny_model_dir, dolly_parquet.parent)
    assert "<|assistant|>" in tok.decode(rows[0]["input_ids"])  # the tiny model's own (Phi-3) template


def test_dataset_extension_and_kaitos_dataset_path(tmp_path, tiny_model_dir):
    data = tmp_path / "mnt-data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "train.data").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(5)))
    with pytest.raises(InvalidInput, match="no data files .*; to read train.data name its format in DatasetConfig.dataset_extension"):
        features(cfg_with(tmp_path), tiny_model_dir, data)
    # Kaito joins dataset_path onto /mnt, where its data volume is /mnt/data.
    for path in ("sub/train.data", "data/sub/train.data", "/mnt/data/sub"):
        cfg = cfg_with(tmp_path, DatasetConfig={"dataset_extension": "json", "dataset_path": path})
        _, (rows, _) = features(cfg, tiny_model_dir, data)
        assert len(rows) == 5, path


def test_pad_token_and_loading_info(tmp_path, tiny_model_dir, caplog):
    from kaito.tuning.trainer import load_model

    cfg = cfg_with(tmp_path, ModelConfig={"output_loading_info": True, "torch_dtype": "float32"},
                   TrainingArguments={"pad_token": "<|endoftext|>"})
    tok = load_tokenizer(cfg, SPEC, tiny_model_dir)
    assert tok.pad_token == "<|endoftext|>"
    with caplog.at_level(logging.INFO, logger="kaito.tuning"):
        model = load_model(cfg, SPEC, tiny_model_dir, gradient_checkpointing=False)
    assert hasattr(model, "peft_config")  # the model, not from_pretrained's (model, info) tuple
    assert any("missing_keys" in r.getMessage() for r in caplog.records)


def test_kaitos_lora_template_trains_through_the_cli(tmp_path, tiny_model_dir, dolly_parquet):
    """Kaito's chart template plus trl fields, run by `kaito tune`: stdout is exactly one JSON document."""
    doc = {"training_config": kaito_sample("kaito-lora-params.yaml")["training_config"]}
    doc["training_config"]["ModelConfig"]["torch_dtype"] = "float32"
    doc["training_config"]["TrainingArguments"].update({"max_steps": 2, "packing": True, "max_length": 128})
    cfg = tmp_path / "training_config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    kaito = Path(sys.executable).parent / "kaito"
    r = subprocess.run(
        [str(kaito), "tune", "--config", str(cfg), "--preset", "tiny-phi-3", "--method", "lora",
         "--data", str(dolly_parquet.parent), "--output", str(tmp_path / "out"), "--model-dir", str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # `kaito tune ... | jq` works: nothing else on stdout
    assert summary["global_step"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "training" in r.stderr and "packing=True" in r.stderr  # the logs went to stderr
