"""Request and response models of the HTTP contract (OpenAI /v1 and Kaito's /chat).

Used by the api routers (`kaito.runtime.api`) to validate bodies and by the
serving layer (`kaito.runtime.serving`) to read them. Bounds here are the
first line against hostile input: every number has a range and every list a
length limit, so bad bodies fail as 400 before touching the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_TEXT = 1_000_000


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's envelope, used for every /v1 failure."""

    error: ErrorInfo


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str = Field(..., max_length=MAX_TEXT)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(..., description="Author of the turn.")
    content: str | list[TextPart] | None = Field("", description="Text, or a list of text parts.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = Field(True, description="Send a final chunk with token usage (we default to yes).")


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions (OpenAI names plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=256, description="Served model name, or an adapter's name for that adapter alone.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (capped by settings.max_tokens_cap).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=100_000, description="-1 or 0 = off.")
    n: int = Field(1, ge=1, description="Choices to generate (at most settings.max_n).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings; not included in the output.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    min_tokens: int = Field(0, ge=0)
    adapter_strength: float | None = Field(None, ge=0.0, le=10.0, description="Override the named adapter's strength for this request.")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > 256 for s in v):
            raise ValueError("stop strings must be 1 to 256 characters")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(..., description="Text, a batch of texts, or token ids.")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > 64:
                raise ValueError("at most 64 prompts per request")
        return v


class GenerateKwargs(BaseModel):
    """Kaito's /chat generate_kwargs with its defaults; unknown keys are accepted (and ignored)."""

    model_config = ConfigDict(extra="allow")
    max_length: int = Field(200, ge=1, description="Prompt + generated tokens (transformers' meaning).")
    max_new_tokens: int | None = Field(None, ge=1)
    min_length: int = Field(0, ge=0)
    do_sample: bool = True
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(10, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    num_beams: int = Field(1, ge=1, le=1)
    early_stopping: bool = False
    num_return_sequences: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class KaitoChatRequest(BaseModel):
    """Kaito's POST /chat body."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    messages: list[dict[str, Any]] | None = Field(None, max_length=1024)
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    prefix: str | None = Field(None, max_length=MAX_TEXT)
    handle_long_generation: Literal["hole"] | None = None
    generate_kwargs: GenerateKwargs = Field(default_factory=GenerateKwargs)


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, max_length=128, description="Name clients will send as `model`.")
    lora_path: str | None = Field(None, max_length=4096, description="Directory with adapter_config.json and adapter_model.safetensors.")
    image: str | None = Field(None, max_length=1024, description="OCI image reference of an adapter image, pulled with the image builder.")
    strength: float | None = Field(None, ge=0.0, le=10.0, description="Default strength (else env/settings, else 1.0).")


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, max_length=128)
