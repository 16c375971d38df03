"""Kaito's `training_config.yaml`, section by section, mapped onto Hugging Face classes.

Called by `kaito.tuning.trainer` (and tests) to turn the mounted config
(`/mnt/config/training_config.yaml`, top key `training_config`, or the whole
ConfigMap manifest; read through `kaito.presets.yamlio`) into validated
kwargs for `from_pretrained` (ModelConfig), `BitsAndBytesConfig`
(QuantizationConfig), `peft.LoraConfig`, `transformers.TrainingArguments`,
`DataCollatorForLanguageModeling` (DataCollator) and our `DatasetConfig`
(which `kaito.tuning.data` reads, with the file readers `READERS`).

Field names are checked against the HF classes themselves, so any field those
classes accept is accepted here (and new ones appear when the libraries
upgrade); an unknown field or section is an `InvalidInput` naming the valid
ones. Fields Kaito's parser adds (trl's SFTConfig names in TrainingArguments,
ModelConfig.chat_template, ...) are mapped first by `kaito.tuning.compat`. Kaito's own checks (lora must not quantize, qlora must quantize,
output_dir under the results root) also live here. Parsing needs only yaml;
the HF classes are imported when the sections are built.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import posixpath
from pathlib import Path
from typing import Any, Optional, Union

from kaito.presets import contract
from kaito.presets.errors import InvalidInput, validation_problem
from kaito.presets.spec import quantization_problem
from kaito.presets.yamlio import parse_mapping, read_mapping
from kaito.tuning.compat import SFT_FIELDS, take_kaito_fields
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("kaito.tuning")

SECTIONS = ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator", "DatasetConfig")
# dataset_extension values (Kaito's: the `datasets` builder names) -> our reader.
READERS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "arrow": "arrow"}
# Kaito's pods mount results here; configs written for Kaito name it, and a
# local run (tests, `kaito tune` on a laptop) rebases it onto --output.
KAITO_RESULTS_ROOT = contract.RESULTS_DIR

# from_pretrained kwargs a tuning config may set (ModelConfig). Model-config
# attribute overrides are deliberately excluded: they change the architecture.
MODEL_KWARGS = frozenset(
    {
        "dtype", "torch_dtype", "local_files_only", "device_map", "revision", "trust_remote_code",
        "attn_implementation", "low_cpu_mem_usage", "max_memory", "offload_folder", "offload_state_dict",
        "offload_buffers", "use_safetensors", "subfolder", "cache_dir", "force_download", "variant",
        "use_cache", "tp_plan", "key_mapping", "use_kernels",
    }
)


class DatasetConfig(BaseModel):
    """Kaito's DatasetConfig plus packing, length and loss settings; column names default to auto-detection."""

    model_config = ConfigDict(extra="forbid")

    dataset_path: Optional[str] = Field(
        None, description="File or folder under the data dir to train on (Kaito's form data/x, relative to /mnt, "
        "works too); default: every data file in it."
    )
    dataset_extension: Optional[str] = Field(
        None, description="Reader for the data files whatever their names: csv, json, jsonl, parquet or arrow."
    )
    shuffle_dataset: bool = Field(True, description="Shuffle rows before the split (Kaito default true).")
    shuffle_seed: int = Field(42, description="Seed of that shuffle, so reruns and resumes see the same order.")
    messages_column: Optional[str] = Field(None, description="Column of OpenAI-style messages; default 'messages'.")
    context_column: Optional[str] = Field(None, description="Prompt side of context/response or prompt/completion rows.")
    response_column: Optional[str] = Field(
        None, description="Answer side (the only tokens that get a loss); alone, with no context column in the "
        "data, the plain-text column (Kaito's meaning)."
    )
    text_column: Optional[str] = Field(None, description="Plain-text column (loss on every token), whatever else is there.")
    dataset_text_field: Optional[str] = Field(
        None, description="trl's name: the plain-text column of rows that hold no chat messages or prompt/completion "
        "pair (default 'text')."
    )
    train_test_split: float = Field(
        1.0, gt=0, le=1, description="Fraction of rows used for training; the rest is the eval set (1 = no eval)."
    )
    packing: bool = Field(
        False, description="Pack several examples per sequence (attention kept separate); off by default like Kaito."
    )
    max_seq_length: Optional[int] = Field(
        1024, gt=8, description="Longest training sequence in tokens (trl: max_length); longer rows are cut; "
        "null: only the model's context length cuts."
    )
    eval_packing: Optional[bool] = Field(None, description="Pack the eval rows too; default: as packing.")
    completion_only_loss: Optional[bool] = Field(
        None, description="Prompt/completion rows: false puts the loss on the prompt too (default: answers only)."
    )
    assistant_only_loss: Optional[bool] = Field(
        None, description="Chat rows: false puts the loss on every turn (default: assistant turns only)."
    )

    @field_validator("dataset_extension")
    @classmethod
    def _known_reader(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.lower().lstrip(".") not in READERS:
            raise ValueError(f"{v!r} cannot be read here; use one of {', '.join(READERS)}")
        return v.lower().lstrip(".") if v else v


class TuningConfig(BaseModel):
    """One parsed training_config: raw per-section dicts plus the typed DatasetConfig."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    model: dict[str, Any] = Field(default_factory=dict)
    quantization: Optional[dict[str, Any]] = None
    lora: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    collator: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    output_dir: Path = Field(description="Resolved TrainingArguments.output_dir (under the results root).")
    chat_template: Optional[str] = Field(None, description="Template replacing the tokenizer's (Kaito's chat_template).")
    loading_info: bool = Field(False, description="Log missing/unexpected weights (ModelConfig.output_loading_info).")
    pad_token: Optional[str] = Field(None, description="Padding token replacing the tokenizer's (trl's pad_token).")
    ignored: list[str] = Field(default_factory=list, description="Kaito fields accepted without effect here.")


def _unknown(section: str, key: str, valid: set[str], what: str) -> InvalidInput:
    close = difflib.get_close_matches(key, sorted(valid), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = "" if len(valid) > 60 else f" (valid: {', '.join(sorted(valid))})"
    return InvalidInput(f"training_config.{section}.{key}: not a field of {what}{hint}{listing}")


def _init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _signature_fields(cls) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _read(source: Union[str, Path, dict]) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    what = "a mapping with the key training_config (Kaito's format)"
    doc = read_mapping(path, f"{what}, or a ConfigMap manifest holding one", name=f"--config {path}",
                       missing="point it at training_config.yaml (the ConfigMap mount)")
    # A whole ConfigMap manifest is accepted too: its data key holds the file.
    if doc.get("kind") == "ConfigMap":
        data = doc.get("data")
        text = data.get(contract.TRAINING_CONFIG_FILE) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise InvalidInput(f"--config {path}: ConfigMap has no data key {contract.TRAINING_CONFIG_FILE} "
                               "(a string holding the file)")
        doc = parse_mapping(text, f"--config {path}: ConfigMap data {contract.TRAINING_CONFIG_FILE}", what)
    return doc


def resolve_output_dir(value: Optional[str], results_root: Path) -> Path:
    """TrainingArguments.output_dir -> a path under the results root (Kaito: must stay under /mnt)."""
    root = Path(results_root).absolute()
    if value is None or value == "":
        return root
    value = str(value)
    norm = posixpath.normpath(value)
    if norm == KAITO_RESULTS_ROOT or norm.startswith(KAITO_RESULTS_ROOT + "/"):
        rel = posixpath.relpath(norm, KAITO_RESULTS_ROOT)
        return root if rel == "." else root / rel
    if not posixpath.isabs(norm):
        if norm == ".." or norm.startswith("../"):
            raise InvalidInput(
                f"training_config.TrainingArguments.output_dir {value!r} escapes the results root {root}; "
                f"use a path under {KAITO_RESULTS_ROOT}"
            )
        return root if norm == "." else root / norm
    p = Path(norm)
    if p == root or root in p.parents:
        return p
    raise InvalidInput(
        f"training_config.TrainingArguments.output_dir {value!r} is outside the results root; "
        f"use {KAITO_RESULTS_ROOT} or a folder under it (here: {root})"
    )


def parse_config(source: Union[str, Path, dict], *, method: str, results_root: Union[str, Path]) -> TuningConfig:
    """Read and check a training config; field names are checked against the HF classes."""
    if method not in ("lora", "qlora"):
        raise InvalidInput(f"--method {method!r} is not one of lora, qlora")
    doc = _read(source)
    if not isinstance(doc, dict) or "training_config" not in doc:
        raise InvalidInput("training config: top-level key 'training_config' is missing (Kaito's format)")
    extra_top = set(doc) - {"training_config"}
    if extra_top:
        raise InvalidInput(f"training config: unknown top-level keys {sorted(extra_top)}; only 'training_config'")
    body = doc["training_config"] or {}
    if not isinstance(body, dict):
        raise InvalidInput("training_config must be a mapping of sections")
    for name in body:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise InvalidInput(f"training_config.{name}: unknown section{hint} (valid: {', '.join(SECTIONS)})")
        if body[name] is not None and not isinstance(body[name], dict):
            raise InvalidInput(f"training_config.{name} must be a mapping of fields, got {type(body[name]).__name__}")
    sec = {k: dict(body.get(k) or {}) for k in SECTIONS}
    kaito = take_kaito_fields(sec)
    _check_fields(sec)
    if kaito.ignored:
        log.warning("training_config: accepted as Kaito does, but without effect on this job: %s",
                    ", ".join(kaito.ignored))

    quant = sec["QuantizationConfig"] if "QuantizationConfig" in body else None
    problem = quantization_problem(method, quant)
    if problem:
        raise InvalidInput(problem)
    try:
        dataset = DatasetConfig(**_merge_dataset(sec["DatasetConfig"], kaito.dataset))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        where = kaito.dataset[loc][0] if loc in kaito.dataset else f"DatasetConfig.{loc}"  # the name the user wrote
        raise InvalidInput(validation_problem({**err, "loc": ("training_config", *where.split("."))})) from None
    out = resolve_output_dir(sec["TrainingArguments"].get("output_dir"), Path(results_root))
    return TuningConfig(
        method=method,
        model=sec["ModelConfig"],
        quantization=quant if method == "qlora" else None,
        lora=sec["LoraConfig"],
        training=sec["TrainingArguments"],
        collator=sec["DataCollator"],
        dataset=dataset,
        output_dir=out,
        chat_template=kaito.chat_template,
        loading_info=kaito.loading_info,
        pad_token=kaito.pad_token,
        ignored=kaito.ignored,
    )


def _merge_dataset(given: dict, from_training: dict[str, tuple[str, Any]]) -> dict:
    """DatasetConfig fields plus those set through trl's names in TrainingArguments; a disagreement is an error."""
    merged = dict(given)
    for key, (where, value) in from_training.items():
        if key in given and given[key] != value and key != "shuffle_dataset":
            raise InvalidInput(
                f"training_config.{where} ({value!r}) and training_config.DatasetConfig.{key} ({given[key]!r}) "
                "say different things; keep one of them"
            )
        merged[key] = value
    return merged


def _check_fields(sec: dict[str, dict]) -> None:
    from peft import LoraConfig
    from transformers import (
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        TrainingArguments,
    )

    checks = {
        "ModelConfig": (set(MODEL_KWARGS), "from_pretrained"),
        "QuantizationConfig": (_signature_fields(BitsAndBytesConfig), "transformers.BitsAndBytesConfig"),
        "LoraConfig": (_init_fields(LoraConfig), "peft.LoraConfig"),
        "TrainingArguments": (_init_fields(TrainingArguments) | SFT_FIELDS, "trl.SFTConfig"),
        "DataCollator": (_init_fields(DataCollatorForLanguageModeling) - {"tokenizer"}, "DataCollatorForLanguageModeling"),
    }
    for section, (valid, what) in checks.items():
        for key in sec[section]:
            if key not in valid:
                raise _unknown(section, str(key), valid, what)


def _dtype(section: str, key: str, value):
    import torch

    if value in (None, "auto") or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise InvalidInput(f"training_config.{section}.{key}: {value!r} is not a torch dtype (e.g. bfloat16, float16)")
    return dt


def build_model_kwargs(cfg: TuningConfig, *, trust_remote_code: bool) -> dict[str, Any]:
    """from_pretrained kwargs; trust_remote_code comes from the preset, never from the config alone."""
    kw = dict(cfg.model)
    if "torch_dtype" in kw:  # transformers 5 renamed it
        kw["dtype"] = kw.pop("torch_dtype")
    if "dtype" in kw:
        kw["dtype"] = _dtype("ModelConfig", "torch_dtype", kw["dtype"])
    if kw.get("trust_remote_code") and not trust_remote_code:
        raise InvalidInput(
            "training_config.ModelConfig.trust_remote_code is true but this preset does not allow remote code; remove it"
        )
    kw["trust_remote_code"] = trust_remote_code
    return kw


def build_quantization(cfg: TuningConfig):
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    kw = dict(cfg.quantization)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if key in kw:
            kw[key] = _dtype("QuantizationConfig", key, kw[key])
    try:
        return BitsAndBytesConfig(**kw)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"training_config.QuantizationConfig: {e}") from None


def build_lora(cfg: TuningConfig, default_targets: list[str]):
    from peft import LoraConfig, TaskType

    kw = dict(cfg.lora)
    r = kw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidInput(f"training_config.LoraConfig.r must be a positive integer (the adapter rank), got {r!r}")
    dropout = kw.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InvalidInput(f"training_config.LoraConfig.lora_dropout must be in [0, 1), got {dropout!r}")
    kw.setdefault("task_type", TaskType.CAUSAL_LM)
    if not kw.get("target_modules"):
        if not default_targets:
            raise InvalidInput("training_config.LoraConfig.target_modules is not set and the preset names none")
        kw["target_modules"] = list(default_targets)
    try:
        return LoraConfig(**kw)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"training_config.LoraConfig: {e}") from None


def build_training_args(cfg: TuningConfig, **forced):
    """TrainingArguments with the user's fields plus what the job needs (`forced` wins)."""
    from transformers import TrainingArguments

    # The user's fields are free-form; TrainingArguments itself checks them (TypeError/ValueError below).
    kw: dict[str, Any] = {"report_to": "none", "logging_steps": 1, "save_total_limit": 2}
    kw.update(cfg.training)
    kw.update(forced)
    kw["output_dir"] = str(cfg.output_dir)
    try:
        return TrainingArguments(**kw)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"training_config.TrainingArguments: {e}") from None
