"""The preset contract: what a model needs and how Kaito runs it.

`PresetSpec` is the one schema for preset data files under
`presets/catalog/*.yaml`; the registry (`kaito.presets.registry`) validates
every file against it. Consumers (image builder, runtime, tuning, operator)
read presets only through this model.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kaito.presets.validate import LABEL_MAX, dns_subdomain_problem

HEX40 = re.compile(r"^[0-9a-f]{40}$")

RunParam = Union[str, int, float, bool]


class AccessMode(str, Enum):
    public = "public"
    private = "private"


class TuningMethod(str, Enum):
    lora = "lora"
    qlora = "qlora"


def quantization_problem(method: str, quant: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Kaito's rule on a training config's QuantizationConfig; None when it holds.

    lora must not quantize, qlora must (4-bit or 8-bit, not both). The one home of
    the rule: the operator's admission (a user's tuning ConfigMap) and the tuning
    job's config parser both call it. The message names the config field.
    """
    four, eight = bool((quant or {}).get("load_in_4bit")), bool((quant or {}).get("load_in_8bit"))
    if method == TuningMethod.lora.value and (four or eight):
        field = "load_in_4bit" if four else "load_in_8bit"
        return (
            f"training_config.QuantizationConfig.{field} is true but method is lora: LoRA must not quantize; "
            "remove QuantizationConfig or use method qlora"
        )
    if method == TuningMethod.qlora.value and not (four or eight):
        return "training_config.QuantizationConfig.load_in_4bit (or load_in_8bit) must be true for method qlora"
    if four and eight:
        return "training_config.QuantizationConfig: set only one of load_in_4bit and load_in_8bit"
    return None


class GPURequirements(BaseModel):
    """Inference GPU needs, in Kaito's three numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_count: int = Field(1, ge=1, description="Minimum number of GPUs across all nodes.")
    total_gpu_memory_gib: float = Field(
        ..., ge=0, description="GPU memory the model needs in total (GiB), summed over all GPUs."
    )
    per_gpu_memory_gib: float = Field(
        0, ge=0, description="Memory each GPU must have (GiB); 0 means the model can be sharded freely."
    )


def kaito_disk_gib(total_gpu_memory_gib: float) -> int:
    """Kaito's rule of thumb: total GPU memory x 2.5 + 48, rounded up to a multiple of 10."""
    return int(math.ceil((total_gpu_memory_gib * 2.5 + 48) / 10.0) * 10)


class PresetSpec(BaseModel):
    """One model preset: identity, weights, resources and how the runtime runs it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    name: str = Field(..., description="Preset name, lowercase DNS-1123 (e.g. phi-3-mini-4k-instruct).")
    family: str = Field(..., description="Model family, e.g. phi3, falcon, mistral, llama, qwen, deepseek.")
    model_type: Literal["text-generation"] = Field(
        "text-generation", description="Task the model serves; Kaito presets are all text-generation."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names resolving to this preset.")
    hf_repo: Optional[str] = Field(
        None, description="Hugging Face repository id (org/name); absent only for embedded presets."
    )
    hf_revision: Optional[str] = Field(
        None, description="Pinned 40-hex commit of hf_repo that the image is built from."
    )
    access_mode: AccessMode = Field(
        AccessMode.public, description="public: we publish the image; private: users bring their own image."
    )
    download_at_runtime: bool = Field(
        False, description="Weights are fetched at container start (gated models needing a token) instead of baked in."
    )
    embedded: Optional[Literal["tiny", "small"]] = Field(
        None, description="Weights are generated offline by kaito.presets.tiny at this size instead of downloaded."
    )
    dtype: str = Field("auto", description="torch dtype the runtime loads weights in (auto, bfloat16, float16, float32).")
    trust_remote_code: bool = Field(
        False, description="Allow the model repository's own Python code; only presets that need it say true."
    )
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template overriding the tokenizer's; absent uses the tokenizer's own."
    )
    image_tag: str = Field(..., description="Tag of the preset image: <registry>/kaito-<name>:<image_tag>.")
    gpu: GPURequirements = Field(..., description="Inference GPU needs checked against the SKU table.")
    disk_gib: Optional[int] = Field(
        None, description="Node disk for weights and image (GiB); Kaito's rule (total x 2.5 + 48, round up to 10) when absent."
    )
    tuning_memory_gib: dict[TuningMethod, float] = Field(
        default_factory=dict,
        description="Per-GPU memory (GiB) needed to tune, by method; a method absent here cannot tune this preset.",
    )
    readiness_timeout_seconds: int = Field(
        1800, gt=0, description="How long the operator waits for the inference pods to be ready."
    )
    lora_target_modules: list[str] = Field(
        default_factory=list, description="Module names LoRA adapters attach to."
    )
    supports_distributed_inference: bool = Field(
        False, description="Can run across several nodes with torchrun (StatefulSet)."
    )
    run_params: dict[str, RunParam] = Field(
        default_factory=dict, description="Extra runtime parameters passed to the runtime command (--key value)."
    )
    weight_files: Optional[list[str]] = Field(
        None, description="Expected weight files (safetensors); checked after download when given."
    )
    max_model_len: Optional[int] = Field(None, gt=0, description="Context length the runtime enforces by default.")

    @field_validator("name")
    @classmethod
    def _dns1123(cls, v: str) -> str:
        # Preset names become image repositories and label values: '.' allowed, 63 at most.
        problem = dns_subdomain_problem(v, LABEL_MAX)
        if problem:
            raise ValueError(f"preset name {problem}")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for a in v:
            cls._dns1123(a)
        return v

    @field_validator("weight_files")
    @classmethod
    def _safetensors_only(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for f in v or []:
            if not f.endswith(".safetensors"):
                raise ValueError(f"weight_files entry {f!r} is not .safetensors: only safetensors weights are accepted")
        return v

    @model_validator(mode="after")
    def _source(self) -> "PresetSpec":
        if self.embedded is None:
            if not self.hf_repo or "/" not in self.hf_repo:
                raise ValueError("hf_repo must be 'org/name' for a preset that is not embedded")
            if not self.hf_revision or not HEX40.match(self.hf_revision):
                raise ValueError("hf_revision must be a pinned 40-hex commit id, not a branch or tag")
        return self

    @property
    def disk(self) -> int:
        """Disk in GiB: the declared value or Kaito's rule."""
        return self.disk_gib if self.disk_gib is not None else kaito_disk_gib(self.gpu.total_gpu_memory_gib)

    @property
    def tunable_methods(self) -> list[str]:
        return sorted(m.value for m in self.tuning_memory_gib)

    def image_ref(self, registry: str) -> str:
        """`<registry>/kaito-<name>:<tag>`, Kaito's tag scheme (one home: kaito.presets.images)."""
        from kaito.presets.images import preset_image

        return preset_image(registry, self.name, self.image_tag)
