"""OpenAI chat and text completions: prompt building, parameters, JSON and SSE responses.

Called by the /v1 routers in `kaito.runtime.api` (and, for the shared prompt/parameter steps, by
`kaito.runtime.responses`); uses `Runtime` from `kaito.runtime.serving` for lookups and the engine.
Streams are SSE (`data: {chunk}` ... `data: [DONE]`); the usage chunk (`choices: []`) comes only with
`stream_options.include_usage`, as OpenAI and vLLM send it. Tokenization and chat templates run in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, cast

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from kaito.runtime import logits
from kaito.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import Finished, Token
from kaito.runtime.serving import ApiError, Runtime, new_id, now

if TYPE_CHECKING:
    from kaito.runtime.loader import Loaded
    from transformers import PreTrainedTokenizerBase

# OpenAI options this server does not implement: a request using one is refused by name, never half-served.
UNSUPPORTED = {"tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no function calling",
               "function_call": "no function calling", "audio": "text only", "modalities": "text only"}
# Values of those options that ask for nothing beyond plain text.
HARMLESS: tuple[object, ...] = (None, [], "none", ["text"])


def reject_unsupported(req) -> None:
    for name, why in UNSUPPORTED.items():
        if getattr(req, name, None) not in HARMLESS:
            raise ApiError(400, f"`{name}` is not supported by this server ({why}); leave it out", param=name)


def ready_model(rt: Runtime) -> Loaded:
    """The loaded model of a runtime that passed `require_ready()` (ready means loaded; it is never unloaded)."""
    model = rt.loaded
    if model is None:
        raise ApiError(503, "the model is not loaded; retry when GET /health says Healthy", "ServiceUnavailableError")
    return model


def ready_tokenizer(rt: Runtime) -> PreTrainedTokenizerBase:
    return ready_model(rt).tokenizer


def vocab_size(model: Loaded) -> int:
    """Rows of the model's logits (may exceed the tokenizer's length: padded embeddings)."""
    return model.model.config.vocab_size


def is_base_path(rt: Runtime, model: str | None) -> bool:
    """Kaito's server also answers to the weights path it was started with (e.g. /workspace/weights/)."""
    if not model or model in rt.strengths:
        return False
    want = str(rt.settings.model_dir).rstrip("/")
    return model.rstrip("/") in (want, str(Path(want).resolve()))


def resolve(rt: Runtime, model: str | None, strength: float | None):
    """The adapter rows for `model`: the served name, the preset, the weights path, or one adapter's name."""
    return rt.resolve(None if is_base_path(rt, model) else model, strength)


def model_label(rt: Runtime, model: str | None) -> str:
    """The `model` field of responses: the adapter's name, else the served name (also when addressed by path)."""
    return model if model and (model in rt.strengths or model in rt.base_names()) else rt.model_name


async def sampling_params(req: SamplingFields, rt: Runtime, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice, with logit_bias and the response_format grammar attached."""
    if req.n > rt.settings.max_n:
        raise ApiError(400, f"n={req.n} exceeds this server's max_n of {rt.settings.max_n}", param="n")
    model = ready_model(rt)
    vocab = vocab_size(model)
    compiled = None
    if req.response_format is not None and req.response_format.type != "text":
        compiled = await rt.prepare(logits.compile_format, req.response_format, model.tokenizer, vocab, model.eos_ids)
    out = [SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        seed=None if req.seed is None else (req.seed + i) % 2**63,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, stop=list(req.stop or []), ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, logprobs=logprobs,
    ) for i in range(req.n)]
    logits.processors(out, bias=req.logit_bias, compiled=compiled, vocab_size=vocab)
    return out


def chat_prompt_ids(rt: Runtime, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the model's chat template (blocking: call in a thread)."""
    tok = ready_tokenizer(rt)
    if not tok.chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions or start with --chat-template", param="messages")
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # jinja raises for conversations the template rejects (e.g. bad role order)
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    ids = out["input_ids"] if isinstance(out, Mapping) else out  # some tokenizers still give a BatchEncoding
    # transformers types every mode's result as one union; one conversation tokenized is a list of ids.
    return list(cast("list[int]", ids))


def decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # transformers types decode as `str | list[str]` for any input; one sequence of ids gives one string.
    return cast(str, tok.decode(ids))


def _tok_text(rt: Runtime, token_id: int) -> str:
    return decode(ready_tokenizer(rt), [token_id])


def _logprob(ev: Token) -> tuple[float, list[tuple[int, float]]]:
    """(chosen, top) of a token of a request that asked for logprobs: the engine gives every such token them."""
    assert ev.logprob is not None, "a token of a request with logprobs came without them"
    return ev.logprob


def _chat_logprob(rt: Runtime, ev: Token) -> dict:
    chosen, top = _logprob(ev)
    t = _tok_text(rt, ev.token_id)
    return {"token": t, "logprob": chosen, "bytes": list(t.encode()),
            "top_logprobs": [{"token": _tok_text(rt, i), "logprob": lp, "bytes": list(_tok_text(rt, i).encode())} for i, lp in top]}


def disconnect_check(request: Request):
    async def check() -> bool:
        return await request.is_disconnected()
    return check


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}


async def merged_events(rt: Runtime, jobs: list[tuple], n: int, disconnected=None):
    """(choice index, event) of several submitted prompts as they come; prompt p's choice i is index p*n + i,
    as vLLM numbers them. jobs: (ids, seqs, queue). Leaving early cancels every prompt's sequences."""
    if len(jobs) == 1:
        async for item in rt.events(jobs[0][1], jobs[0][2], disconnected):
            yield item
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, seqs, queue) -> None:
        try:
            async for idx, ev in rt.events(seqs, queue, disconnected):
                out.put_nowait((p * n + idx, ev))
        except ApiError as e:
            out.put_nowait(e)
        finally:
            out.put_nowait(None)

    tasks = [asyncio.create_task(pump(p, seqs, queue)) for p, (_, seqs, queue) in enumerate(jobs)]
    try:
        left = len(tasks)
        while left:
            item = await out.get()
            if item is None:
                left -= 1
            elif isinstance(item, ApiError):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _text_chunk(head: str, key: str, close: str = ""):
    """Encoder for the plain text chunks of one stream (no logprobs): the constant part is formatted once,
    only the choice index and the escaped text per token (the hot path of streaming: one chunk per token
    per client)."""
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    tail = close + ',"logprobs":null,"finish_reason":null}]}\n\n'

    def encode(idx: int, text: str) -> bytes:
        return f'{head}{idx},{key}{dumps(text)}{tail}'.encode()
    return encode


def _head(rid: str, obj: str, created: int, model: str) -> str:
    return f'data: {{"id":{json.dumps(rid)},"object":"{obj}","created":{created},"model":{json.dumps(model, ensure_ascii=False)},"choices":[{{"index":'


def _stream(rt: Runtime, jobs, n: int, *, obj: str, rid: str, created: int, model: str, include_usage: bool,
            text_chunk, token_choice, end_choice, prelude=()) -> StreamingResponse:
    """The SSE response of one request, chat or text: `prelude` choices first, then one chunk per event
    (plain text through the preformatted `text_chunk`, tokens with logprobs through `token_choice`, each
    choice's end through `end_choice`), the usage chunk when asked, and `data: [DONE]`; an engine failure
    ends the stream with an error event."""
    def chunk(choices: list, **extra) -> bytes:
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra})

    async def events():
        completion = 0
        for c in prelude:
            yield chunk([c])
        try:
            async for idx, ev in merged_events(rt, jobs, n):
                if isinstance(ev, Token):
                    if ev.logprob is None:
                        if ev.text:
                            yield text_chunk(idx, ev.text)
                        continue
                    yield chunk([token_choice(idx, ev)])
                elif isinstance(ev, Finished):
                    completion += ev.completion_tokens
                    yield chunk([end_choice(idx, ev)])
        except ApiError as e:
            yield _sse(error_body(e))
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield chunk([], usage=usage(sum(len(j[0]) for j in jobs), completion))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_completions(rt: Runtime, req: ChatCompletionRequest, request: Request):
    rt.require_ready()
    reject_unsupported(req)
    lora = resolve(rt, req.model, req.adapter_strength)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    ids = await rt.prepare(chat_prompt_ids, rt, messages)
    max_tokens = rt.check_length(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
    want_lp = req.top_logprobs or 0 if req.logprobs else None
    params = await sampling_params(req, rt, max_tokens, want_lp)
    seqs, queue = rt.submit(ids, params, lora)
    rid, created, model = new_id("chatcmpl"), now(), model_label(rt, req.model)

    if req.stream:
        return _stream(
            rt, [(ids, seqs, queue)], req.n, obj="chat.completion.chunk", rid=rid, created=created, model=model,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            text_chunk=_text_chunk(_head(rid, "chat.completion.chunk", created, model), '"delta":{"content":', "}"),
            token_choice=lambda idx, ev: {"index": idx, "delta": {"content": ev.text},
                                          "logprobs": {"content": [_chat_logprob(rt, ev)]}, "finish_reason": None},
            end_choice=lambda idx, ev: {"index": idx, "delta": {}, "logprobs": None, "finish_reason": ev.reason},
            prelude=[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(len(seqs))],
        )

    texts = [""] * len(seqs)
    lps: list[list] = [[] for _ in seqs]
    reasons: list = [None] * len(seqs)
    completion = 0
    async for idx, ev in rt.events(seqs, queue, disconnect_check(request)):
        if isinstance(ev, Token):
            texts[idx] += ev.text
            if ev.logprob is not None:
                lps[idx].append(_chat_logprob(rt, ev))
        elif isinstance(ev, Finished):
            reasons[idx] = ev.reason
            completion += ev.completion_tokens
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": reasons[i]} for i in range(len(seqs))]
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(len(ids), completion)})


def _token_ids(prompt: list[str] | list[int]) -> TypeGuard[list[int]]:
    return all(isinstance(x, int) for x in prompt)


def _completion_prompts(rt: Runtime, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt (blocking: call in a thread)."""
    tok = ready_tokenizer(rt)
    p = req.prompt
    if isinstance(p, str):
        return [tok(p)["input_ids"]]
    if _token_ids(p):
        vocab = len(tok)
        if any(x < 0 or x >= vocab for x in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return [list(p)]
    return [tok(x)["input_ids"] for x in p]


def _lp_block(rt: Runtime, evs: list[Token], offset: int) -> dict:
    """Completions' logprobs object for a run of tokens whose text starts at character `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for ev in evs:
        t = _tok_text(rt, ev.token_id)
        offsets.append(offset)
        offset += len(t)
        tokens.append(t)
        chosen, top = _logprob(ev)
        token_lps.append(chosen)
        tops.append({_tok_text(rt, i): lp for i, lp in top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def score_prompt(rt: Runtime, ids: list[int], k: int, lora) -> dict:
    """The completions logprobs block of a prompt (first token: null, as OpenAI and vLLM give it)."""
    scores: list = []
    if len(ids) > 1:
        forced = logits.ForcedPrompt(ids, k)
        params = SamplingParams(max_tokens=len(ids) - 1, temperature=0.0, ignore_eos=True, logits_processors=[forced])
        seqs, queue = rt.submit(ids[:1], [params], lora)
        async for _ in rt.events(seqs, queue):
            pass
        scores = forced.scores
    texts = [_tok_text(rt, t) for t in ids]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [None] + [s[0] for s in scores],
            "top_logprobs": [None] + [{_tok_text(rt, i): lp for i, lp in s[1]} for s in scores], "text_offset": offsets}


def _joined(head: dict | None, tail: dict | None) -> dict | None:
    """Prompt logprobs (echo) followed by the completion's."""
    if head is None or tail is None:
        return tail
    return {key: head[key] + tail[key] for key in head}


async def _submit_all(rt: Runtime, req: CompletionRequest, prompts: list[list[int]], budgets: list[int], lora) -> list[tuple]:
    """Submit every prompt (all or none: a refusal cancels the ones already queued)."""
    rt.check_capacity(len(prompts) * req.n)  # the whole request at once: 400 when it could never fit
    jobs: list[tuple] = []
    try:
        for ids, budget in zip(prompts, budgets):
            jobs.append((ids, *rt.submit(ids, await sampling_params(req, rt, budget, req.logprobs), lora)))
    except ApiError:
        if rt.engine is not None:  # jobs were queued, so it is; checked for the type
            for _, seqs, _ in jobs:
                rt.engine.cancel(seqs)
        raise
    return jobs


async def completions(rt: Runtime, req: CompletionRequest, request: Request):
    rt.require_ready()
    reject_unsupported(req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported by this server", param="suffix")
    lora = resolve(rt, req.model, req.adapter_strength)
    prompts = await rt.prepare(_completion_prompts, rt, req)
    if any(not ids for ids in prompts):
        raise ApiError(400, "prompt is empty; give at least one token of text", param="prompt")
    tok = ready_tokenizer(rt)
    budgets = [rt.check_length(len(ids), req.max_tokens, "prompt") for ids in prompts]  # refused before any work
    scored: list = [None] * len(prompts)
    if req.echo and req.logprobs is not None:
        scored = list(await asyncio.gather(*[score_prompt(rt, ids, req.logprobs, lora) for ids in prompts]))
    jobs = await _submit_all(rt, req, prompts, budgets, lora)
    rid, created, model = new_id("cmpl"), now(), model_label(rt, req.model)
    echoes = [decode(tok, ids) if req.echo else "" for ids in prompts]

    if req.stream:
        return _stream(
            rt, jobs, req.n, obj="text_completion", rid=rid, created=created, model=model,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            text_chunk=_text_chunk(_head(rid, "text_completion", created, model), '"text":'),
            token_choice=lambda idx, ev: {"index": idx, "text": ev.text, "logprobs": _lp_block(rt, [ev], 0), "finish_reason": None},
            end_choice=lambda idx, ev: {"index": idx, "text": "", "logprobs": None, "finish_reason": ev.reason},
            prelude=[{"index": p * req.n + i, "text": echoes[p], "logprobs": scored[p], "finish_reason": None}
                     for p in range(len(jobs)) for i in range(req.n)] if req.echo else (),
        )

    total = len(jobs) * req.n
    texts = [echoes[i // req.n] for i in range(total)]
    evs: list[list[Token]] = [[] for _ in range(total)]
    reasons: list = [None] * total
    completion = 0
    async for idx, ev in merged_events(rt, jobs, req.n, disconnect_check(request)):
        if isinstance(ev, Token):
            texts[idx] += ev.text
            evs[idx].append(ev)
        elif isinstance(ev, Finished):
            reasons[idx] = ev.reason
            completion += ev.completion_tokens
    choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                "logprobs": _joined(scored[i // req.n], _lp_block(rt, evs[i], len(echoes[i // req.n])))
                if req.logprobs is not None else None}
               for i in range(total)]
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(sum(len(ids) for ids in prompts), completion)})
