"""The tuning run: preset + config + data -> LoRA/QLoRA training with atomic checkpoints and resume.

Called by `kaito.tuning.cli` (`python -m kaito.tuning`, `kaito tune`), bench/tuning.py and tests.

    # one GPU (or CPU), the tuning Job's command:
    python -m kaito.tuning --config /mnt/config/training_config.yaml --preset phi-3-mini-4k-instruct \
        --method qlora --data /mnt/data --output /mnt/results --push REF --push-secret /var/run/secrets/kaito/docker/config.json
    # several GPUs on one node (DDP through accelerate):
    torchrun --nproc_per_node 4 -m kaito.tuning --config ... --preset ... --method lora --data ... --output ...
    # two nodes:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m kaito.tuning ...

Transformers' Trainer drives the loop, so every TrainingArguments field
works. We add what Kaito's job lacked: each checkpoint is written to a
staging folder and renamed into place (a kill never leaves a half checkpoint
that a rerun would load), a rerun resumes from the newest checkpoint with
its optimizer, scheduler, RNG and data position (so it ends at the same
adapter), the log shows tokens/s, and `fine_tuning_completed.txt` appears
only after the adapter files are complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

from kaito.presets import PresetSpec, contract, get_preset
from kaito.presets.errors import InvalidInput
from kaito.tuning import SENTINEL, default_config_path
from kaito.tuning.config import (
    TuningConfig,
    build_lora,
    build_model_kwargs,
    build_quantization,
    build_training_args,
    parse_config,
)
from kaito.tuning.output import adapter_complete, push_adapter, write_adapter

log = logging.getLogger("kaito.tuning")

DEFAULT_MODEL_DIR = Path(contract.WEIGHTS_DIR)
STAGING = ".staging"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints in step order; only renamed (hence complete) ones match the pattern."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _publish_checkpoint(run_dir: Path, name: str, save_total_limit: Optional[int]) -> None:
    """Rename the complete staged checkpoint into place, then drop the oldest past save_total_limit."""
    staged = run_dir / STAGING / name
    _fsync_tree(staged)
    final = run_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    try:
        (run_dir / STAGING).rmdir()
    except OSError:
        pass
    _fsync_dir(run_dir)
    if save_total_limit:
        for old in complete_checkpoints(run_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def _make_trainer_class():
    import torch
    from transformers import Trainer

    class KaitoTrainer(Trainer):
        """Trainer with atomic checkpoints and a tokens/s figure in every log line."""

        _staging = False
        _tokens = 0
        _last_log = (0, 0.0)

        def _get_output_dir(self, trial):
            run_dir = super()._get_output_dir(trial)
            return os.path.join(run_dir, STAGING) if self._staging else run_dir

        def _save_checkpoint(self, model, trial):
            run_dir = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(run_dir / STAGING / name, ignore_errors=True)
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            self._barrier()  # every rank has written its part before the main one renames the folder
            if self.args.should_save:
                _publish_checkpoint(run_dir, name, self.args.save_total_limit)
            self._barrier()

        def _barrier(self):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()

        def _prepare_inputs(self, inputs):
            n = inputs.pop("num_tokens", None)
            if n is not None and self.model is not None and self.model.training:
                if not self._last_log[1]:  # the first batch starts the tokens/s clock
                    self._last_log = (self._tokens, time.monotonic())
                self._tokens += int(n)
            return super()._prepare_inputs(inputs)

        def log(self, logs, start_time=None):
            now = time.monotonic()
            tokens, then = self._last_log
            if then and "loss" in logs:
                logs["tokens_per_s"] = round((self._tokens - tokens) / max(now - then, 1e-9), 1)
            logs["tokens_seen"] = self._tokens
            self._last_log = (self._tokens, now)
            super().log(logs, start_time)

    return KaitoTrainer


def _callbacks() -> list:
    from transformers import TrainerCallback

    delay = float(os.environ.get("KAITO_TUNING_STEP_DELAY_S", "0") or 0)
    if delay <= 0:
        return []

    class Throttle(TrainerCallback):
        # Slows each step so that kill/resume can be shown (tests, demos) on
        # models that train too fast to interrupt.
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(delay)

    return [Throttle()]


def _resolve_model_dir(preset: PresetSpec, model_dir: Optional[Path], output: Path) -> Path:
    d = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if (d / "config.json").is_file():
        return d
    if preset.embedded and model_dir is None:
        from kaito.presets import make_tiny

        tiny = output / ".kaito-model"
        if not (tiny / "config.json").is_file():
            make_tiny(tiny, size=preset.embedded, overwrite=True)
        return tiny
    raise InvalidInput(f"--model-dir {d}: no model weights (config.json) there; mount the preset's weights")


def _device_map(kwargs: dict) -> None:
    """Each DDP rank keeps a whole model copy on its own device; 'auto' would shard it."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local if torch.cuda.is_available() else "cpu"}
    elif not torch.cuda.is_available() and kwargs.get("device_map") == "auto":
        kwargs["device_map"] = {"": "cpu"}


def load_tokenizer(cfg: TuningConfig, spec: PresetSpec, model_dir: Path):
    """The model's tokenizer with the config's chat template and pad token (Kaito: ModelConfig.chat_template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=spec.trust_remote_code)
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if cfg.pad_token is not None:
        tok.pad_token = cfg.pad_token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def max_sequence_length(cfg: TuningConfig, spec: PresetSpec, tok) -> int:
    """DatasetConfig.max_seq_length (trl: max_length), never past the preset's context; null: the context only."""
    limits = [n for n in (cfg.dataset.max_seq_length, spec.max_model_len) if n]
    return min(limits) if limits else int(min(tok.model_max_length, 2**31 - 1))


def load_model(cfg: TuningConfig, preset: PresetSpec, model_dir: Path, gradient_checkpointing: bool):
    """Base model (4-bit for qlora) with LoRA layers attached."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = build_model_kwargs(cfg, trust_remote_code=preset.trust_remote_code)
    quant = build_quantization(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    _device_map(kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=cfg.loading_info, **kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"loading the model from {model_dir} with training_config.ModelConfig: {e}") from None
    if cfg.loading_info:
        # transformers types from_pretrained as returning the model; output_loading_info makes it (model, info)
        model, info = cast("tuple[Any, dict]", model)
        log.info("model loading info (ModelConfig.output_loading_info): %s", info)
    # A KV cache is useless in training and would stop transformers from
    # building the block-diagonal mask that packing relies on.
    model.config.use_cache = False
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = build_lora(cfg, preset.lora_target_modules)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise InvalidInput(f"training_config.LoraConfig.target_modules: {e}") from None
    return model


def _check_push_ref(push: str) -> None:
    """A bad output image fails here, before hours of training, not at the push after them."""
    from kaito.image_builder.oci.reference import parse_reference

    try:
        parse_reference(push, "--push")
    except InvalidInput as e:
        raise InvalidInput(
            f"{e} (the adapter image to push, e.g. myregistry.azurecr.io/adapters/phi-3:0.0.1)"
        ) from None


def run_tuning(
    *,
    preset: str,
    method: str,
    data: Sequence[str],
    output: Union[str, Path],
    config: Union[str, Path, dict, None] = None,
    model_dir: Union[str, Path, None] = None,
    push: Optional[str] = None,
    push_secret: Union[str, Path, None] = None,
    fetch_kwargs: Optional[dict] = None,
) -> dict:
    """Train (or resume) and write the adapter; push it when asked. Returns a summary dict."""
    spec = get_preset(preset)
    if method not in spec.tunable_methods:
        raise InvalidInput(
            f"--method {method}: preset {spec.name} cannot be tuned with {method} "
            f"(supported: {', '.join(spec.tunable_methods) or 'none'})"
        )
    if push_secret and not push:
        raise InvalidInput("--push-secret needs --push REF (the output image)")
    if push:
        _check_push_ref(push)
    if push_secret:
        try:
            readable = Path(push_secret).is_file() and os.access(push_secret, os.R_OK)
        except OSError as e:  # a parent directory this user may not enter
            raise InvalidInput(f"--push-secret {push_secret}: cannot be read ({e.strerror})") from None
        if not readable:
            raise InvalidInput(
                f"--push-secret {push_secret}: no such file, or not readable (the mounted dockerconfigjson)"
            )
    output = Path(output).absolute()
    cfg = parse_config(
        config if config is not None else default_config_path(method), method=method, results_root=output
    )
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"output_dir": str(out_dir), "resumed_from": None}

    if (out_dir / SENTINEL).is_file() and adapter_complete(out_dir):
        log.info("%s exists: training already completed, not training again", out_dir / SENTINEL)
        summary["skipped_training"] = True
    else:
        summary.update(_train(cfg, spec, data, output, out_dir, model_dir, fetch_kwargs or {}))
    if push and int(os.environ.get("RANK", "0")) == 0:
        summary["digest"] = push_adapter(out_dir, push, preset_name=spec.name, auth_file=push_secret)
    return summary


def _train(cfg, spec, data, output, out_dir, model_dir, fetch_kwargs) -> dict:
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    cuda = torch.cuda.is_available()
    # Under torchrun this initialises the process group (NCCL on GPUs; gloo on
    # CPU, which accelerate only picks when told cpu=True).
    state = PartialState(cpu=not cuda)
    data_dir, mdir = _stage_inputs(state, spec, data, output, out_dir, model_dir, fetch_kwargs)
    args = _training_args(cfg, cuda)
    set_seed(args.seed)
    trainer = _build_trainer(cfg, spec, mdir, data_dir, args, log_summary=state.is_main_process)
    ckpts = complete_checkpoints(out_dir)
    resume = str(ckpts[-1]) if ckpts else None
    if resume:
        log.info("resuming from %s", resume)
    model = trainer.model  # the PEFT model as built: the Trainer may wrap what it trains (DDP)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    summary = {
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "tokens_per_s": trainer._tokens / max(time.monotonic() - started, 1e-9),
        "weights_mib": round(model.get_memory_footprint() / 2**20, 2),
    }
    if state.is_main_process:
        write_adapter(trainer.model, out_dir)
    state.wait_for_everyone()
    return summary


def _stage_inputs(state, spec, data, output, out_dir, model_dir, fetch_kwargs) -> tuple[Path, Path]:
    """(data dir, model dir): fetched or made by the main process first, then found ready by the other ranks."""
    from kaito.tuning.fetch import resolve_data

    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(out_dir / STAGING, ignore_errors=True)
        data_dir = resolve_data(list(data), output / ".kaito-data", **fetch_kwargs)
        mdir = _resolve_model_dir(spec, Path(model_dir) if model_dir else None, output)
    return data_dir, mdir


def _training_args(cfg: TuningConfig, cuda: bool):
    """The config's TrainingArguments with what this trainer needs forced (and CPU defaults off a GPU)."""
    forced: dict[str, Any] = {"remove_unused_columns": False}
    if not cuda:
        forced["use_cpu"] = True
        if "dataloader_pin_memory" not in cfg.training:
            forced["dataloader_pin_memory"] = False
    return build_training_args(cfg, **forced)


def _build_trainer(cfg: TuningConfig, spec: PresetSpec, mdir: Path, data_dir: Path, args, *, log_summary: bool):
    """Tokenizer, features, collator and LoRA model wired into a KaitoTrainer."""
    from kaito.tuning.data import Collator, build_features

    tok = load_tokenizer(cfg, spec, mdir)
    train, evals = build_features(tok, data_dir, cfg.dataset, max_sequence_length(cfg, spec, tok))
    if cfg.collator.get("mlm"):
        # Kaito's default asks for MLM; a causal LM has no mask token, so Kaito's
        # collator fell back to next-token prediction. So do we.
        log.info("DataCollator.mlm ignored: causal language modelling (the tokenizer has no mask token)")
    collator = Collator(tok.pad_token_id, cfg.collator.get("pad_to_multiple_of"))
    model = load_model(cfg, spec, mdir, bool(args.gradient_checkpointing))
    if log_summary:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "training %d examples (%s, packing=%s); %d trainable parameters",
            len(train),
            cfg.method,
            cfg.dataset.packing,
            trainable,
        )
    return _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=collator,
        processing_class=tok,
        callbacks=_callbacks(),
    )
