"""Runtime settings: one pydantic-settings model for every knob of the server.

Read by `kaito.runtime.launch.main` (behind `python -m kaito.runtime` and `kaito serve`) through `load_settings`, then
passed to `build_app(settings)`. Sources, highest priority first: command-line
flags, `KAITO_*` environment variables, the YAML config file
(`--config /mnt/config/inference_config.yaml`, keys are the field names below,
optionally under a top-level `runtime:` key), then defaults. Kaito's own
environment contract is honoured too: `LOCAL_RANK` shifts the port
(5000 + LOCAL_RANK) and an env var named exactly like an adapter gives that
adapter's strength (e.g. `phi-3-adapter=0.5`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from kaito.presets import get_preset
from kaito.presets.errors import InvalidInput, KaitoError, validation_problem
from kaito.presets.yamlio import read_mapping

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("kaito.runtime.settings")


class RuntimeSettings(BaseSettings):
    """Everything the inference server can be told; field names are the config-file keys."""

    model_config = SettingsConfigDict(env_prefix="KAITO_", extra="forbid", validate_default=True)

    model_dir: Path = Field(Path("/workspace/weights"), description="Directory holding config.json, tokenizer and safetensors weights.")
    preset: str | None = Field(None, description="Preset name (kaito.presets); gives dtype, trust_remote_code, chat template and context length.")
    served_model_name: str | None = Field(None, description="Model id clients send as `model`; default the preset name, else the model dir's name.")
    host: str = Field("0.0.0.0", description="Interface uvicorn binds to.")
    port: int = Field(5000, ge=1, le=65535, description="Base port; the process listens on port + LOCAL_RANK as Kaito did.")
    dtype: str = Field("auto", description="torch dtype: auto (the preset's, else bfloat16 on CUDA and float32 on CPU), float32, bfloat16, float16.")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code; refused unless the preset allows it.")
    adapters_dir: Path = Field(Path("/mnt/adapter"), description="Every sub-directory holding adapter_config.json is loaded at start.")
    adapter_strengths: dict[str, float] = Field(default_factory=dict, description="Strength per adapter name; the env var named after the adapter wins, default 1.0.")
    # Off by default, as in vLLM: loading reads any server path or pulls any image the caller names.
    enable_lora_loading: bool = Field(False, description="Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter at run time.")
    adapter_pull_root: Path = Field(Path("/tmp/kaito-adapters"), description="Where adapter images named in load_lora_adapter are extracted.")
    adapter_pull_auth_file: Path | None = Field(None, description="dockerconfigjson used to pull adapter images (never logged).")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Sequences decoded together in one forward pass.")
    max_waiting: int = Field(256, ge=0, description="Requests queued beyond the running batch; more get 429 with Retry-After.")
    prefill_thread: bool = Field(False, description="Prefill arriving prompts on a second thread while the running batch keeps decoding, and send their first tokens as soon as their own forward is done. Off by default: on CPU one forward thread with every core as torch threads served faster in every measured case (88M bench model, 2 cores, 32 clients, with the step defaults below: 345 -> 526 tok/s, TTFT p99 782 -> 532 ms), and two forward threads with several OpenMP threads each oversubscribe the cores; use it with torch_threads=1. On a GPU both threads would queue kernels on one device: unmeasured here, so off there too. Never under torchrun (every rank replays one serial plan), for architectures outside the fast path (Phi-3, Llama, Mistral, Qwen2) or for rotary embeddings that rescale with the sequence length (dynamic, longrope).")
    prefill_step_ratio: float = Field(4.0, ge=0, description="While sequences are decoding, one engine step prefills new prompts for at most this multiple of its decode's time, beyond one chunk (prefill_chunk_tokens) that it always takes (0 = no time bound; a step prefills 4,096 prompt tokens at most). A burst of arrivals is then admitted over a few steps, running streams keep their pace, and clients that arrived together stop moving in lock-step. Without the prefill thread only.")
    prefill_chunk_tokens: int = Field(512, ge=1, description="Admitted prompts are prefilled in forwards of at most this many tokens, counted with their left padding (one prompt at least); each chunk's first tokens are sent before the next chunk runs, and an engine step always prefills one chunk. Measured (88M bench model, 2 cores, 32 clients of 16-token prompts): 128 -> 512 took TTFT p99 640 -> 500 ms and p50 320 -> 360 ms.")
    max_model_len: int | None = Field(None, ge=8, description="Context length enforced (prompt + completion); default the preset's, else the model config's.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="Completion length when a /v1 request gives no max_tokens (capped by the context).")
    max_n: int = Field(8, ge=1, le=64, description="Largest `n` (choices per request).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request bodies above this size get 413.")
    api_key: SecretStr | None = Field(None, description="When set, /v1 and /chat need `Authorization: Bearer <key>`.")
    chat_template: str | None = Field(None, description="Chat template override: a file path or the Jinja text itself.")
    pipeline: Literal["text-generation", "conversational"] | None = Field(None, description="Kaito pipeline for /chat error messages; default the preset's run_params.pipeline.")
    decode_run_ms: float = Field(50.0, ge=0, le=10_000, description="Greedy streams (temperature 0, no penalties, logprobs or adapter) on the CPU step decode up to 64 tokens per call while nothing else waits, and the tokens the call has finished are streamed at most this long after they were (several together when steps are faster); an arrival or cancellation ends a run at the next token. 0: one token per step.")
    compile_decode: bool = Field(False, description="Run decode steps with no adapter row through torch.compile (inductor, dynamic shapes); linear weights then stay dense (not oneDNN-packed). Fused kernels and a fraction of the Python per step: for latency (few concurrent streams) and small models. Startup compiles three graphs before /health turns ready (about 30-60 s each for a small model on 2 CPU cores, minutes for larger ones; cached under /tmp/torchinductor_<user>). Single process only (not under torchrun). Measured on 2 CPU cores, 1 thread (TPOT p50, tok/s): 3.7M bench model 2.4 -> 1.5 ms at 1 client, 3,642 -> 5,056 tok/s at 32; 88M model 33 -> 28 ms at 1 client, but 350 -> 310 tok/s at 32 (packed weights win there).")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op CPU threads; default on CPU: the cores this process may use (affinity, cgroup quota), minus one left to the HTTP server from 4 cores up, unless OMP_NUM_THREADS is set. 1 avoids OpenMP stalls on shared CPUs.")
    tensor_parallel: bool = Field(True, description="Under torchrun on CUDA, shard with transformers' tp_plan when the model has one; else replicate.")
    log_level: str = Field("info", description="uvicorn and kaito log level.")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return check_dtype(v)

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline(cls, v):
        return v if v is None else check_pipeline(v)


DTYPES = ("auto", "float32", "bfloat16", "float16")
PIPELINES = ("text-generation", "conversational")


def check_dtype(v: str) -> str:
    """The one dtype rule of flags, env and config; the message carries Kaito's phrase for the same error."""
    if v not in DTYPES:
        raise ValueError(f"Invalid torch dtype {v!r}: use one of {', '.join(DTYPES)}")
    return v


def check_pipeline(v: str) -> str:
    if v not in PIPELINES:
        raise ValueError(f"Unsupported pipeline {v!r}: use one of {', '.join(PIPELINES)}")
    return v


def preflight(settings: RuntimeSettings) -> None:
    """What loading would fail on, checked before anything heavy starts (so `kaito serve` exits at once):
    a preset that does not exist, a model directory without config.json."""
    if settings.preset:
        get_preset(settings.preset)
    model_dir = Path(settings.model_dir)
    if not (model_dir / "config.json").is_file():
        raise KaitoError(f"model dir {model_dir}: config.json not found; point --model-dir at the preset's weights")


FIELD_NAMES = sorted(RuntimeSettings.model_fields)


# Kaito's own inference_config.yaml keys (its template has `vllm:` and `max_probe_steps:`). Users' existing
# ConfigMaps must keep working, so these are accepted: the vLLM options we have an equivalent for are mapped,
# the rest (GPU memory fraction, swap, probing) have no meaning for this engine and are ignored with a log line.
KAITO_KEYS = {"vllm", "max_probe_steps"}
VLLM_MAP = {"max-model-len": "max_model_len", "max-num-seqs": "max_batch_size", "served-model-name": "served_model_name",
            "dtype": "dtype", "chat-template": "chat_template"}


def _from_kaito(data: dict, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    vllm = data.get("vllm") or {}
    if not isinstance(vllm, dict):
        raise InvalidInput(f"--config {path}: `vllm:` must be a mapping of vLLM option names to values")
    for key, value in vllm.items():
        if key in VLLM_MAP:
            out[VLLM_MAP[key]] = value
        else:
            log.info("config %s: vllm option %r has no equivalent in kaito.runtime; ignored", path, key)
    return out


def read_config_file(path: Path | None) -> dict[str, Any]:
    """Settings from the YAML config: field names at top level or under `runtime:`, plus Kaito's `vllm:` keys.

    Unknown keys are an error naming the valid ones.
    """
    if path is None:
        return {}
    path = Path(path)
    data = read_mapping(path, "a mapping of setting names to values", name=f"--config {path}",
                        missing="give the path of a YAML file with runtime settings")
    settings = _from_kaito(data, path)
    if "runtime" in data:
        section = data["runtime"] or {}
        if not isinstance(section, dict):
            raise InvalidInput(f"--config {path}: `runtime:` must be a mapping of setting names to values")
        rest = set(data) - KAITO_KEYS - {"runtime"}
        if rest:
            raise InvalidInput(f"--config {path}: unknown top-level key(s) {sorted(rest)}; put settings under `runtime:` "
                               f"(valid settings are: {', '.join(FIELD_NAMES)})")
    else:
        section = {k: v for k, v in data.items() if k not in KAITO_KEYS}
    unknown = sorted(set(section) - set(FIELD_NAMES))
    if unknown:
        raise InvalidInput(f"--config {path}: unknown setting(s) {unknown}; valid settings are: {', '.join(FIELD_NAMES)}")
    settings.update(section)
    return settings


def _format(err: ValidationError, where: str) -> str:
    parts = [validation_problem(e, root="settings") for e in err.errors()]
    return f"invalid runtime settings ({where}): " + "; ".join(parts)


def load_settings(overrides: dict[str, Any] | None = None, config: Path | None = None) -> RuntimeSettings:
    """Merge flags (overrides, None values skipped) over KAITO_* env over the config file over defaults."""
    file_data = read_config_file(config)
    try:
        env = RuntimeSettings()
    except ValidationError as e:
        raise InvalidInput(_format(e, "KAITO_* environment")) from None
    merged = dict(file_data)
    merged.update({k: getattr(env, k) for k in env.model_fields_set})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return RuntimeSettings(**merged)
    except ValidationError as e:
        raise InvalidInput(_format(e, "flags/env/config")) from None


def listen_port(settings: RuntimeSettings) -> int:
    """Kaito's rule: each local rank listens on base port + LOCAL_RANK."""
    return settings.port + int(os.environ.get("LOCAL_RANK", "0") or 0)


def adapter_strength(settings: RuntimeSettings, name: str) -> float:
    """Strength of an adapter: the env var named exactly like it (Kaito), else settings, else 1.0."""
    raw = os.environ.get(name)
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            raise InvalidInput(f"env var {name}={raw!r}: an adapter's strength must be a number such as 1.0") from None
    return float(settings.adapter_strengths.get(name, 1.0))
