"""Request and response models of the HTTP contract (OpenAI /v1 and Kaito's /chat).

Used by the api routers (`kaito.runtime.api`) to validate bodies and by the
serving logic that reads them (`openai_serving`, `kaito_chat`, `responses`). Bounds here are the
first line against hostile input: every number has a range and every list a
length limit, so bad bodies fail as 400 before touching the engine.

Sampling bounds follow vLLM's SamplingParams checks, tightened where float32
would break: temperature in [0, 2] (values in (0, 0.01) raised to 0.01, as
vLLM), top_p in (0, 1] and not 0 in float32, top_k -1/0 (off) or up to
2**31-1, repetition_penalty in [0.01, 10], presence/frequency penalties in
[-2, 2], min_tokens <= max_tokens, best_of == n, logprobs/top_logprobs up to
20 (top_logprobs only with logprobs), logit_bias values in [-100, 100], text
that is valid Unicode (no lone surrogates). OpenAI options not implemented
(`tools`, `tool_choice`, `functions`, `function_call`, `audio`, `modalities`
other than text) are parsed so the serving layer can refuse them by name.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_TEXT = 1_000_000
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
TOP_K_MAX = 2**31 - 1  # any larger top_k means "whole vocabulary" and overflows int32 kernels
# vLLM's _MAX_TEMP: 0 < temperature < 0.01 makes logits overflow to inf/NaN; vLLM raises it to 0.01 with a warning.
MIN_TEMPERATURE = 1e-2
MIN_REPETITION_PENALTY = 1e-2  # vLLM says only "> 0"; dividing logits by 1e-40 overflows float32, 0.01 cannot


def utf8_text(v):
    """Strings must be encodable as UTF-8: a lone surrogate ("\\ud800") is the client's error, not ours."""
    for s in ([v] if isinstance(v, str) else v if isinstance(v, list) else []):
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text is not valid Unicode (lone surrogate); send UTF-8 text") from None
    return v


def float32_positive(v: float) -> float:
    """A probability that rounds to 0 in float32 (the sampler's dtype) would mask every token."""
    if struct.unpack("f", struct.pack("f", v))[0] <= 0.0:
        raise ValueError("must be in (0, 1] and not round to 0 in float32 (at least about 1.4e-45)")
    return v


def raise_tiny_temperature(v: float) -> float:
    """vLLM's rule: a temperature in (0, 0.01) is raised to 0.01 (smaller ones overflow the logits)."""
    return MIN_TEMPERATURE if 0.0 < v < MIN_TEMPERATURE else v


Text = Annotated[str, AfterValidator(utf8_text)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus mass in (0, 1]."), AfterValidator(float32_positive)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: Text = Field(..., max_length=MAX_TEXT)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(..., description="Author of the turn.")
    content: Text | list[TextPart] | None = Field("", description="Text, or a list of text parts.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a final chunk (`choices: []`) with token usage, as OpenAI does only when asked.")
    continuous_usage_stats: bool = Field(False, description="vLLM's extra; accepted, usage still comes once at the end.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("schema", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The JSON Schema the output must match.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object (any JSON object) or json_schema (output valid for the schema)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a `json_schema` object with a `schema`")
        return self


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions (OpenAI names plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=256, description="Served model name, or an adapter's name for that adapter alone.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (capped by settings.max_tokens_cap).")
    temperature: Annotated[float, AfterValidator(raise_tiny_temperature)] = Field(
        1.0, ge=0.0, le=2.0, description="0 = greedy; values in (0, 0.01) are raised to 0.01 as vLLM does.")
    top_p: TopP = 1.0
    top_k: int = Field(-1, ge=-1, le=TOP_K_MAX, description="-1 or 0 = off.")
    n: int = Field(1, ge=1, description="Choices to generate (at most settings.max_n).")
    best_of: int | None = Field(None, ge=1, description="Accepted only equal to n (no server-side ranking).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings; not included in the output.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0, description="1 = off; in [0.01, 10].")
    logit_bias: dict[str, float] | None = Field(None, max_length=300, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    response_format: ResponseFormat | None = None
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    min_tokens: int = Field(0, ge=0)
    adapter_strength: float | None = Field(None, ge=0.0, le=10.0, description="Override the named adapter's strength for this request.")
    user: str | None = Field(None, max_length=256)
    # OpenAI options this server does not implement: present (non-empty) -> 400 naming them, never ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings; got {k[:40]!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100]; token {k} has {b}")
        return v

    @model_validator(mode="after")
    def _combined(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) must equal n ({self.n}); this server does not rank extra candidates")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

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
        return utf8_text(v)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    audio: Any = Field(None, description="Not supported (text only): 400 when given.")
    modalities: list[str] | None = Field(None, description="Only ['text']; anything else is 400.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(..., description="Text, a batch of texts, or token ids.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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
        return utf8_text(v)


class GenerateKwargs(BaseModel):
    """Kaito's /chat generate_kwargs with its defaults; unknown keys are accepted (and ignored)."""

    model_config = ConfigDict(extra="allow")
    max_length: int = Field(200, ge=1, description="Prompt + generated tokens (transformers' meaning).")
    max_new_tokens: int | None = Field(None, ge=1)
    min_length: int = Field(0, ge=0)
    do_sample: bool = True
    temperature: Annotated[float, AfterValidator(raise_tiny_temperature)] = Field(
        1.0, ge=0.0, le=100.0, description="0 = greedy; values in (0, 0.01) are raised to 0.01 as vLLM does.")
    top_k: int = Field(10, ge=0, le=TOP_K_MAX)
    top_p: TopP = 1.0
    typical_p: float = Field(1.0, gt=0.0, le=1.0, description="Only 1.0 (off): typical sampling is not implemented, other values get 400.")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0, description="1 = off; in [0.01, 10].")
    num_beams: int = Field(1, ge=1, le=1)
    early_stopping: bool = False
    num_return_sequences: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("typical_p")
    @classmethod
    def _typical(cls, v):
        if v != 1.0:
            raise ValueError("typical_p is not supported by this server; leave it out or set 1.0")
        return v


class KaitoChatRequest(BaseModel):
    """Kaito's POST /chat body."""

    model_config = ConfigDict(extra="ignore")
    prompt: Text | None = Field(None, max_length=MAX_TEXT)
    messages: list[dict[str, Any]] | None = Field(None, max_length=1024)
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    prefix: Text | None = Field(None, max_length=MAX_TEXT)
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


class ResponseContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: Text = Field(..., max_length=MAX_TEXT)


class ResponseInputItem(BaseModel):
    """One message of the Responses API's `input` list (text only)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[ResponseContentPart] = Field(..., description="Text, or input_text/output_text parts.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseTextFormat(BaseModel):
    """The Responses API's text.format: text, json_object, or json_schema with its fields flattened."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = Field("schema", max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def as_response_format(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.schema_ is None:
                raise ValueError("text.format of type json_schema needs a `schema`")
            schema = JsonSchemaFormat(name=self.name, schema_=self.schema_)
            return ResponseFormat(type="json_schema", json_schema=schema)
        return ResponseFormat(type=self.type)


class ResponseText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponseTextFormat = Field(default_factory=ResponseTextFormat)


class ResponsesRequest(SamplingFields):
    """OpenAI's POST /v1/responses, text in and text out; nothing is stored server-side."""

    input: Text | list[ResponseInputItem] = Field(..., description="A user message, or a list of messages.")
    instructions: Text | None = Field(None, max_length=MAX_TEXT, description="Sent as a system message first.")
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: str | None = Field(None, description="Not supported (responses are not stored).")
    text: ResponseText | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 1024:
            raise ValueError("input must hold 1 to 1024 messages")
        return v

    @model_validator(mode="after")
    def _format(self):
        if self.text is not None and self.response_format is None:
            self.response_format = self.text.format.as_response_format()
        return self
