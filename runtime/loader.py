"""Loads what the server runs: model, tokenizer, chat template, EOS ids and context length.

Called by `kaito.runtime.serving.Runtime.load` (which `kaito.runtime.api.build_app`
starts in a background thread, so /health can answer 503 while loading) and by
the non-zero torchrun ranks in `kaito.runtime.distributed.worker_loop`.
The preset, when named, decides dtype, trust_remote_code, chat template and
context length; a flag may only narrow what the preset allows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from kaito.presets import get_preset
from kaito.presets.errors import InvalidInput
from kaito.runtime.settings import RuntimeSettings, preflight

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("kaito.runtime.loader")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]
    max_model_len: int
    model_name: str
    pipeline: str
    chat_template: str | None


def resolve_device(settings: RuntimeSettings) -> torch.device:
    if settings.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(settings.device)


def _chat_template(settings: RuntimeSettings, preset_template: str | None) -> str | None:
    t = settings.chat_template
    if t:
        # A short string naming an existing file is a path; anything else is the template itself.
        if len(t) < 4096 and "{" not in t:
            p = Path(t)
            if not p.is_file():
                raise InvalidInput(f"chat_template {t!r}: no such file; give a Jinja template file or the template text")
            return p.read_text()
        return t
    return preset_template


def load(settings: RuntimeSettings, tp_plan: str | None = None) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    preflight(settings)
    preset = get_preset(settings.preset) if settings.preset else None
    allowed_remote = bool(preset and preset.trust_remote_code)
    if settings.trust_remote_code and not allowed_remote:
        raise InvalidInput(
            "trust_remote_code: refused because the preset does not allow running the model repository's code"
            + (f" (preset {preset.name} has trust_remote_code: false)" if preset else " (no --preset given)")
        )
    trust = allowed_remote
    model_dir = Path(settings.model_dir)
    device = resolve_device(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    dtype_name = settings.dtype
    if dtype_name == "auto":
        dtype_name = preset.dtype if preset and preset.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    log.info("loading %s (%s) on %s", model_dir, dtype_name, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    kwargs = dict(dtype=dtype, trust_remote_code=trust)
    if tp_plan:
        kwargs["tp_plan"] = tp_plan
    elif device.type == "cuda" and torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        kwargs["device_map"] = "auto"  # one process across all GPUs (Kaito's default for big models)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "device_map" not in kwargs and not tp_plan:
        # transformers declares PreTrainedModel.to through functools.wraps, which mypy does not bind as a
        # method; calling it through a Callable keeps the checks transformers adds there (quantized models).
        move: Callable[..., PreTrainedModel] = model.to
        model = move(device)
    model.eval()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)

    eos: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in eos:
                eos.append(int(i))
    limit = getattr(config, "max_position_embeddings", None) or 2048
    max_len = settings.max_model_len or (preset.max_model_len if preset and preset.max_model_len else limit)
    if max_len > limit:
        raise InvalidInput(f"max_model_len {max_len} exceeds the model's max_position_embeddings {limit}")
    name = settings.served_model_name or (preset.name if preset else model_dir.name)
    pipeline = settings.pipeline or (str(preset.run_params.get("pipeline")) if preset and preset.run_params.get("pipeline") else "text-generation")
    template = _chat_template(settings, preset.chat_template if preset else None)
    if template:
        tokenizer.chat_template = template
    return Loaded(model, tokenizer, eos, int(max_len), name, pipeline, tokenizer.chat_template)
