"""Fields Kaito's tuning parser accepts beyond the Hugging Face classes, mapped onto this job's settings.

Called by `kaito.tuning.config.parse_config` before it checks field names.
Kaito's job (presets/workspace/tuning/text-generation/{cli,parser}.py at its
main) parses the TrainingArguments section as trl's `SFTConfig` and adds
fields of its own to ModelConfig, QuantizationConfig, DataCollator and
DatasetConfig. A config that ran on Kaito must run here with the same
meaning, so each such field is taken out of its section here and either
moved to the setting that does the same thing (`packing` ->
DatasetConfig.packing, `max_length` -> DatasetConfig.max_seq_length,
`dataset_text_field` -> DatasetConfig.dataset_text_field, `chat_template` -> the
tokenizer's template, ...) or, when it cannot apply on this job, dropped and
named in the one warning that `parse_config` logs.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kaito.presets.errors import InvalidInput

# trl SFTConfig fields (trl 1.x, plus `max_seq_length`, trl < 0.20's name for
# max_length) -> the DatasetConfig field with the same meaning here.
SFT_TO_DATASET = {
    "packing": "packing",
    "max_length": "max_seq_length",
    "max_seq_length": "max_seq_length",
    "dataset_text_field": "dataset_text_field",
    "eval_packing": "eval_packing",
    "completion_only_loss": "completion_only_loss",
    "assistant_only_loss": "assistant_only_loss",
}
# SFTConfig fields whose effect is taken care of elsewhere on this job.
SFT_APPLIED = frozenset({"shuffle_dataset", "chat_template_path", "pad_token", "pad_to_multiple_of"})
# SFTConfig fields that change nothing when left at this value (our behaviour).
SFT_NOOP_VALUES = {"truncation_mode": "keep_start", "loss_type": "nll", "packing_strategy": "bfd"}
# SFTConfig fields with no effect on this job: model loading is ours (the
# preset decides trust_remote_code, model_init_kwargs only applies to a model
# given by name), data preparation is in-process (no dataset workers), and
# sequences already end with the tokenizer's eos. Older trl names included.
SFT_IGNORED = frozenset(
    {
        "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "dataset_kwargs", "dataset_num_proc",
        "eos_token", "padding_free", "activation_offloading", "dataset_batch_size", "num_of_sequences",
        "chars_per_token", "use_liger",
    }
)
SFT_FIELDS = frozenset(SFT_TO_DATASET) | SFT_APPLIED | frozenset(SFT_NOOP_VALUES) | SFT_IGNORED
# Kaito's ModelConfig fields that are not from_pretrained kwargs of a local model
# (the weights are the preset's, from the image or --model-dir).
MODEL_IGNORED = frozenset({"state_dict", "proxies", "pretrained_model_name_or_path"})
# Where Kaito's images hold the preset's weights: naming it changes nothing.
KAITO_WEIGHTS = "/workspace/tfs/weights"


@dataclass
class KaitoFields:
    """What Kaito's extra fields of one config became."""

    dataset: dict[str, tuple[str, Any]] = field(default_factory=dict)  # DatasetConfig key -> (source field, value)
    chat_template: Optional[str] = None
    loading_info: bool = False
    pad_token: Optional[str] = None
    ignored: list[str] = field(default_factory=list)  # "Section.field" names without effect here


def _unset(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def load_chat_template(value: str, where: str) -> str:
    """Kaito's rule: text holding `{`, `}` or a newline is the template (escapes like \\n decoded); else a file path."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where}: give a Jinja template or the path of a template file, got {value!r}")
    if any(c in value for c in "{}\n"):
        # unicode_escape reads latin-1 bytes; backslashreplace keeps other characters intact.
        return codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")
    path = Path(value)
    if not path.is_file():
        raise InvalidInput(f"{where}: {value!r} is no file here; give the template inline or mount the file there")
    return path.read_text()


def _take_model(sec: dict, out: KaitoFields) -> None:
    model = sec["ModelConfig"]
    for key in sorted(MODEL_IGNORED & set(model)):
        value = model.pop(key)
        if not _unset(value) and value != KAITO_WEIGHTS:
            out.ignored.append(f"ModelConfig.{key}")
    if "chat_template" in model and model["chat_template"] is not None:
        out.chat_template = load_chat_template(model.pop("chat_template"), "training_config.ModelConfig.chat_template")
    model.pop("chat_template", None)
    out.loading_info = bool(model.pop("output_loading_info", False))


def _take_training(sec: dict, out: KaitoFields) -> None:
    training = sec["TrainingArguments"]
    for key in sorted(SFT_FIELDS & set(training)):
        value = training.pop(key)
        where = f"TrainingArguments.{key}"
        if key in SFT_TO_DATASET:
            out.dataset[SFT_TO_DATASET[key]] = (where, value)
        elif key == "shuffle_dataset":
            if value:  # Kaito shuffles when either its DatasetConfig or trl says so
                out.dataset["shuffle_dataset"] = (where, True)
        elif key == "chat_template_path":
            if value is not None and out.chat_template is None:
                out.chat_template = load_chat_template(value, f"training_config.{where}")
        elif key == "pad_token":
            out.pad_token = value
        elif key == "pad_to_multiple_of":
            if isinstance(value, int) and not isinstance(value, bool):
                sec["DataCollator"].setdefault("pad_to_multiple_of", value)
            elif value not in (None, "auto"):
                raise InvalidInput(f"training_config.{where}: {value!r} is not a whole number or 'auto'")
        elif key in SFT_NOOP_VALUES:
            if value is not None and value != SFT_NOOP_VALUES[key]:
                out.ignored.append(f"{where}={value}")
        elif not _unset(value):
            out.ignored.append(where)


def take_kaito_fields(sec: dict[str, dict]) -> KaitoFields:
    """Take Kaito's non-HF fields out of the raw sections (in place) and say what they become."""
    out = KaitoFields()
    _take_model(sec, out)
    _take_training(sec, out)
    quant_method = sec["QuantizationConfig"].pop("quant_method", None)
    # Kaito's job hands every config to BitsAndBytesConfig, which ignores quant_method.
    if quant_method is not None and str(quant_method).lower() != "bitsandbytes":
        out.ignored.append(f"QuantizationConfig.quant_method={quant_method}")
    if not _unset(sec["DataCollator"].pop("tokenizer", None)):
        out.ignored.append("DataCollator.tokenizer")
    return out
