"""Per-row logits processors for the OpenAI options that steer tokens: `logit_bias` and `response_format`.

Called by the OpenAI serving layer (`kaito.runtime.openai_serving`, `kaito.runtime.responses`), which puts
the processors in `SamplingParams.logits_processors`; the sampler (`kaito.runtime.sampling`) calls each one
as fn(output_ids, row) on the engine thread before penalties and temperature, as vLLM's processors are.

`ForcedPrompt` scores a prompt for `echo` + `logprobs` through the same decode path.

Structured output uses llguidance (one of vLLM's structured-output backends; a small Rust library that
runs on CPU and needs neither triton nor a GPU, so the CPU image stays lean): one `LLTokenizer` per
tokenizer, one `LLMatcher` per choice. The matcher is fed the tokens the row has sampled since its last
call, then masks every token that would leave the grammar; once the JSON is complete only the stop tokens
stay allowed, so the choice ends with finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
import weakref

import torch
from kaito.runtime.sampling import LOGPROB_FLOOR
from kaito.runtime.serving import ApiError

_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> list:
    """A processor adding OpenAI's logit_bias (token id -> [-100, 100]) to each row; 400 for ids off the vocabulary."""
    if not bias:
        return []
    ids, values = [], []
    for key, value in bias.items():
        tid = int(key)
        if not 0 <= tid < vocab_size:
            raise ApiError(400, f"logit_bias token id {tid} is outside the vocabulary [0, {vocab_size})", param="logit_bias")
        ids.append(tid)
        values.append(float(value))
    index, add = torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)

    def apply(output_ids: list[int], row: torch.Tensor) -> None:
        row.index_add_(0, index.to(row.device), add.to(row.device, row.dtype))
    return [apply]


def _ll_tokenizer(tokenizer, vocab_size: int, stop_ids: list[int]):
    """llguidance's view of a tokenizer, built once per (tokenizer, vocab, stops): building it scans the vocabulary."""
    import llguidance.hf

    with _compilers_lock:
        found = _compilers.get(tokenizer)
        if found is None or found[0] != (vocab_size, tuple(stop_ids)):
            try:
                ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids) or None)
            except Exception as e:  # llguidance reads only byte-level and SentencePiece-style decoders
                raise ApiError(400, "response_format is not supported for this model: the grammar engine "
                               f"(llguidance) cannot read its tokenizer ({str(e)[:200]})", param="response_format") from e
            found = ((vocab_size, tuple(stop_ids)), ll)
            _compilers[tokenizer] = found
        return found[1]


def compile_format(response_format, tokenizer, vocab_size: int, stop_ids: list[int]):
    """The grammar for an OpenAI response_format, or None for text. Slow the first time: call off the loop.

    json_object is any JSON object (as OpenAI defines it); whitespace between tokens is not free, so a small
    model cannot wander in blank space until max_tokens.
    """
    import llguidance

    if response_format is None or response_format.type == "text":
        return None
    schema = {"type": "object"} if response_format.type == "json_object" else response_format.json_schema.schema_
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception as e:  # llguidance raises ValueError for schemas it cannot even read
        error = str(e)
    if error:
        raise ApiError(400, f"response_format.json_schema.schema cannot be used: {str(error)[:300]}", param="response_format")
    return _ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar


class GrammarMask:
    """One choice's grammar state; the processor the sampler calls once per step of that row."""

    def __init__(self, compiled):
        import llguidance
        import llguidance.torch as llt

        tokenizer, grammar = compiled
        self._llt = llt
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.fed = 0
        self.bitmask = llt.allocate_token_bitmask(1, tokenizer.vocab_size)

    def __call__(self, output_ids: list[int], row: torch.Tensor) -> None:
        for t in output_ids[self.fed:]:
            self.matcher.consume_token(t)  # a token outside the grammar can only be a stop token; nothing to undo
        self.fed = len(output_ids)
        self._llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # The mask is computed on the CPU; the row is edited where it lives.
        apply_bitmask(row, self.bitmask[0] if row.is_cpu else self.bitmask[0].to(row.device))


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(row: torch.Tensor, words: torch.Tensor) -> None:
    """Set to -inf, in place, every token of `row` [V] whose bit is clear in `words` (int32 [ceil(V/32)]: bit j
    of word i allows token 32*i + j; tokens past the words are masked).

    Why not llguidance's `apply_token_bitmask_inplace`: that kernel is a torch.compile function, so on CPU its
    first call needs a C++ compiler (none in the slim runtime image: every structured-output request failed
    there) and stalls the engine for the compile, and a stale inductor cache broke it here. These five eager
    ops cost microseconds per row."""
    bits = (words.unsqueeze(-1) >> _BITS.to(words.device)) & 1  # [W, 32]
    allowed = bits.reshape(-1)[:row.shape[-1]].bool()
    n = allowed.shape[0]
    row[:n].masked_fill_(~allowed, float("-inf"))
    if row.shape[-1] > n:
        row[n:] = float("-inf")


def processors(params: list, *, bias: dict[str, float] | None, compiled, vocab_size: int) -> None:
    """Attach logit_bias and (a fresh matcher per choice) the grammar mask to each choice's SamplingParams."""
    shared = logit_bias(bias, vocab_size)
    for p in params:
        p.logits_processors = list(shared) + ([GrammarMask(compiled)] if compiled is not None else [])


class ForcedPrompt:
    """Teacher-forces a prompt through the decode path and records each prompt token's logprob.

    For `echo` with `logprobs` (prompt scoring): the sequence starts from the prompt's first token and, at
    step i, this processor reads the model's distribution (raw logits: logprobs of the prompt as vLLM
    reports them), records token i+1's logprob and its top `k`, then leaves only token i+1 allowed. The
    rows run through the same engine, batch and adapters as any request (one decode step per prompt token).
    """

    def __init__(self, prompt_ids: list[int], k: int):
        self.ids, self.k = prompt_ids, k
        self.scores: list[tuple[float, list[tuple[int, float]]]] = []

    def __call__(self, output_ids: list[int], row: torch.Tensor) -> None:
        target = self.ids[min(len(output_ids) + 1, len(self.ids) - 1)]
        lp = row.float().log_softmax(-1)
        top = []
        if self.k:
            vals, ids = lp.topk(min(self.k, lp.shape[0]))
            top = list(zip(ids.tolist(), vals.tolist()))
        if len(self.scores) < len(self.ids) - 1:
            self.scores.append((max(float(lp[target]), LOGPROB_FLOOR), top))
        row.fill_(float("-inf"))
        row[target] = 0.0
