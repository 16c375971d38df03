"""OpenAI's Responses API (POST /v1/responses), text in and text out, streamed or not.

Called by the /v1/responses router in `kaito.runtime.api`; reuses the chat path of
`kaito.runtime.openai_serving` (chat template, sampling parameters, model resolution). `input` (a string
or a list of messages) and `instructions` (a system message) become one conversation; the answer is one
`message` output item with one `output_text` part. Streams are SSE `event: <type>` / `data: {...}` pairs
in OpenAI's order: response.created, response.in_progress, output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done, response.completed.
Nothing is stored, so `previous_response_id` is refused.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from kaito.runtime import openai_serving as oai
from kaito.runtime.protocol import ResponsesRequest
from kaito.runtime.sequence import Finished, Token
from kaito.runtime.serving import ApiError, Runtime, new_id, now


def _messages(req: ResponsesRequest) -> list[dict]:
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return out + [{"role": "user", "content": req.input}]
    return out + [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.input]


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _message(msg_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []}


class _Shape:
    """The constant fields of one response object; `body()` fills in status, output and usage."""

    def __init__(self, rt: Runtime, req: ResponsesRequest, max_tokens: int):
        self.rid, self.msg_id, self.created = new_id("resp"), new_id("msg"), now()
        fmt = req.response_format.type if req.response_format else "text"
        self.fixed = {
            "id": self.rid, "object": "response", "created_at": self.created, "model": oai.model_label(rt, req.model),
            "instructions": req.instructions, "max_output_tokens": max_tokens, "metadata": req.metadata or {},
            "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": req.temperature, "top_p": req.top_p, "text": {"format": {"type": fmt}},
            "tool_choice": "none", "tools": [], "truncation": "disabled", "user": req.user, "error": None,
        }

    def body(self, status: str, output: list, usage: dict | None, reason: str | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
        return {**self.fixed, "status": status, "output": output, "usage": usage, "incomplete_details": incomplete}


def _status(reason: str | None) -> str:
    return "incomplete" if reason == "length" else "completed"


async def create(rt: Runtime, req: ResponsesRequest, request: Request):
    rt.require_ready()
    oai.reject_unsupported(req)
    if req.previous_response_id:
        raise ApiError(400, "previous_response_id is not supported: this server stores no responses; send the whole "
                            "conversation in `input`", param="previous_response_id")
    if req.n != 1:
        raise ApiError(400, "the Responses API answers one output; n must be 1", param="n")
    lora = oai.resolve(rt, req.model, req.adapter_strength)
    ids = await rt.prepare(oai.chat_prompt_ids, rt, _messages(req))
    max_tokens = rt.check_length(len(ids), req.max_output_tokens or req.max_tokens, "input")
    params = await oai.sampling_params(req, rt, max_tokens, None)
    seqs, queue = rt.submit(ids, params, lora)
    shape = _Shape(rt, req, max_tokens)
    if req.stream:
        return StreamingResponse(_events(rt, shape, ids, seqs, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, reason, completion = "", None, 0
    async for _, ev in rt.events(seqs, queue, oai.disconnect_check(request)):
        if isinstance(ev, Token):
            text += ev.text
        elif isinstance(ev, Finished):
            reason, completion = ev.reason, ev.completion_tokens
    status = _status(reason)
    return JSONResponse(shape.body(status, [_message(shape.msg_id, text, "completed")], _usage(len(ids), completion), reason))


async def _events(rt: Runtime, shape: _Shape, ids: list[int], seqs, queue):
    seq_no = 0

    def event(type_: str, **fields) -> bytes:
        nonlocal seq_no
        data = {"type": type_, "sequence_number": seq_no, **fields}
        seq_no += 1
        return f"event: {type_}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()

    where = {"item_id": shape.msg_id, "output_index": 0}
    yield event("response.created", response=shape.body("in_progress", [], None))
    yield event("response.in_progress", response=shape.body("in_progress", [], None))
    yield event("response.output_item.added", output_index=0, item=_message(shape.msg_id, "", "in_progress"))
    yield event("response.content_part.added", **where, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
    text, reason, completion = "", None, 0
    try:
        async for _, ev in rt.events(seqs, queue):
            if isinstance(ev, Token):
                if ev.text:
                    text += ev.text
                    yield event("response.output_text.delta", **where, content_index=0, delta=ev.text, logprobs=[])
            elif isinstance(ev, Finished):
                reason, completion = ev.reason, ev.completion_tokens
    except ApiError as e:
        yield event("error", code=str(e.status), message=e.message, param=e.param)
        return
    item = _message(shape.msg_id, text, "completed")
    yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
    yield event("response.content_part.done", **where, content_index=0, part=item["content"][0])
    yield event("response.output_item.done", output_index=0, item=item)
    final = "response.incomplete" if reason == "length" else "response.completed"
    yield event(final, response=shape.body(_status(reason), [item], _usage(len(ids), completion), reason))
