"""OpenAI chat and text completions: prompt building, parameters, JSON and SSE responses.

Called by the /v1 routers in `kaito.runtime.api`; uses `Runtime` from
`kaito.runtime.serving` for lookups and the engine. Streams are SSE
(`data: {chunk}` ... `data: [DONE]`) with a final usage chunk.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from kaito.runtime.engine import Token
from kaito.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.serving import ApiError, Runtime, new_id, now


def sampling_params(req: SamplingFields, rt: Runtime, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    if req.n > rt.settings.max_n:
        raise ApiError(400, f"n={req.n} exceeds this server's max_n of {rt.settings.max_n}", param="n")
    out = []
    for i in range(req.n):
        out.append(SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=None if req.seed is None else (req.seed + i) % 2**63,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=list(req.stop or []), ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, logprobs=logprobs,
        ))
    return out


def _tok_text(rt: Runtime, token_id: int) -> str:
    return rt.loaded.tokenizer.decode([token_id])


def _chat_logprob(rt: Runtime, ev: Token) -> dict:
    chosen, top = ev.logprob
    t = _tok_text(rt, ev.token_id)
    return {"token": t, "logprob": chosen, "bytes": list(t.encode()),
            "top_logprobs": [{"token": _tok_text(rt, i), "logprob": lp, "bytes": list(_tok_text(rt, i).encode())} for i, lp in top]}


def _disconnect(request: Request):
    async def check() -> bool:
        return await request.is_disconnected()
    return check


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _guard(events):
    """Pass events through; an ApiError mid-stream becomes one final (None, {"error": ...}) item."""
    try:
        async for item in events:
            yield item
    except ApiError as e:
        yield None, {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}


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


def _stream(rt: Runtime, seqs, queue, *, obj: str, rid: str, created: int, model: str, prompt_tokens: int,
            include_usage: bool, text_chunk, token_choice, end_choice, prelude=()) -> StreamingResponse:
    """The SSE response of one request, chat or text: `prelude` choices first, then one chunk per event
    (plain text through the preformatted `text_chunk`, tokens with logprobs through `token_choice`, each
    choice's end through `end_choice`), the usage chunk, and `data: [DONE]`; an engine failure ends the
    stream with an error event."""
    def chunk(choices: list, **extra) -> bytes:
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra})

    async def events():
        completion = 0
        for c in prelude:
            yield chunk([c])
        async for idx, ev in _guard(rt.events(seqs, queue)):
            if isinstance(ev, dict):
                yield _sse(ev)
                yield "data: [DONE]\n\n"
                return
            if isinstance(ev, Token):
                if ev.logprob is None:
                    if ev.text:
                        yield text_chunk(idx, ev.text)
                    continue
                yield chunk([token_choice(idx, ev)])
            else:
                completion += ev.completion_tokens
                yield chunk([end_choice(idx, ev)])
        if include_usage:
            yield chunk([], usage=_usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_completions(rt: Runtime, req: ChatCompletionRequest, request: Request):
    rt.require_ready()
    lora = rt.resolve(req.model, req.adapter_strength)
    tok = rt.loaded.tokenizer
    if not tok.chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions or start with --chat-template", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # jinja raises for conversations the template rejects (e.g. bad role order)
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    max_tokens = rt.check_length(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
    want_lp = req.top_logprobs or 0 if req.logprobs else None
    params = sampling_params(req, rt, max_tokens, want_lp)
    seqs, queue = rt.submit(ids, params, lora)
    rid, created, model = new_id("chatcmpl"), now(), req.model or rt.model_name

    if req.stream:
        include_usage = req.stream_options.include_usage if req.stream_options else True
        return _stream(
            rt, seqs, queue, obj="chat.completion.chunk", rid=rid, created=created, model=model,
            prompt_tokens=len(ids), include_usage=include_usage,
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
    async for idx, ev in rt.events(seqs, queue, _disconnect(request)):
        if isinstance(ev, Token):
            texts[idx] += ev.text
            if ev.logprob is not None:
                lps[idx].append(_chat_logprob(rt, ev))
        else:
            reasons[idx] = ev.reason
            completion += ev.completion_tokens
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": reasons[i]} for i in range(len(seqs))]
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(len(ids), completion)})


def _completion_prompts(rt: Runtime, req: CompletionRequest) -> list[list[int]]:
    tok = rt.loaded.tokenizer
    p = req.prompt
    if isinstance(p, str):
        return [tok(p)["input_ids"]]
    if all(isinstance(x, int) for x in p):
        vocab = len(tok)
        if any(x < 0 or x >= vocab for x in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return [list(p)]
    return [tok(x)["input_ids"] for x in p]


async def completions(rt: Runtime, req: CompletionRequest, request: Request):
    rt.require_ready()
    if req.suffix:
        raise ApiError(400, "suffix is not supported by this server", param="suffix")
    lora = rt.resolve(req.model, req.adapter_strength)
    prompts = _completion_prompts(rt, req)
    if any(not ids for ids in prompts):
        raise ApiError(400, "prompt is empty; give at least one token of text", param="prompt")
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "streaming supports one prompt per request", param="prompt")
    budgets = [rt.check_length(len(ids), req.max_tokens, "prompt") for ids in prompts]
    tok = rt.loaded.tokenizer
    rid, created, model = new_id("cmpl"), now(), req.model or rt.model_name
    jobs = []
    try:
        for ids, budget in zip(prompts, budgets):
            jobs.append((ids, *rt.submit(ids, sampling_params(req, rt, budget, req.logprobs), lora)))
    except ApiError:
        for _, seqs, _ in jobs:
            rt.engine.cancel(seqs)
        raise

    def lp_block(evs: list[Token], offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for ev in evs:
            t = _tok_text(rt, ev.token_id)
            offsets.append(offset)
            offset += len(t)
            tokens.append(t)
            token_lps.append(ev.logprob[0])
            tops.append({_tok_text(rt, i): lp for i, lp in ev.logprob[1]})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    if req.stream:
        ids, seqs, queue = jobs[0]
        include_usage = req.stream_options.include_usage if req.stream_options else True
        return _stream(
            rt, seqs, queue, obj="text_completion", rid=rid, created=created, model=model,
            prompt_tokens=len(ids), include_usage=include_usage,
            text_chunk=_text_chunk(_head(rid, "text_completion", created, model), '"text":'),
            token_choice=lambda idx, ev: {"index": idx, "text": ev.text, "logprobs": lp_block([ev], 0), "finish_reason": None},
            end_choice=lambda idx, ev: {"index": idx, "text": "", "logprobs": None, "finish_reason": ev.reason},
            prelude=[{"index": i, "text": tok.decode(ids), "logprobs": None, "finish_reason": None}
                     for i in range(len(seqs))] if req.echo else (),
        )

    choices, prompt_total, completion_total = [], 0, 0
    for p_i, (ids, seqs, queue) in enumerate(jobs):
        texts = [tok.decode(ids) if req.echo else ""] * len(seqs)
        evs: list[list[Token]] = [[] for _ in seqs]
        reasons: list = [None] * len(seqs)
        async for idx, ev in rt.events(seqs, queue, _disconnect(request)):
            if isinstance(ev, Token):
                texts[idx] += ev.text
                evs[idx].append(ev)
            else:
                reasons[idx] = ev.reason
                completion_total += ev.completion_tokens
        prompt_total += len(ids)
        for i in range(len(seqs)):
            lp = lp_block(evs[i], len(texts[i]) - sum(len(e.text) for e in evs[i])) if req.logprobs is not None else None
            choices.append({"index": p_i * len(seqs) + i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(prompt_total, completion_total)})
