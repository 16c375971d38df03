"""Kaito's classic POST /chat, answered exactly as Kaito's transformers-pipeline server did.

Called by the /chat router in `kaito.runtime.api`. Semantics kept from Kaito
(and transformers' text-generation pipeline underneath it):
`generate_kwargs.max_length` counts prompt + new tokens, `do_sample: false`
means greedy, `return_full_text` prepends the prompt (not the `prefix`),
`handle_long_generation: "hole"` cuts the prompt from the left to make room,
`num_return_sequences` results are concatenated, errors are FastAPI `detail`
messages. All /chat requests run with every adapter merged at its strength.
generate_kwargs are bounded by `kaito.runtime.protocol.GenerateKwargs` (an empty prompt, a top_p that
rounds to 0, typical_p other than 1 are refused before anything runs); tokenization runs off the loop.
"""

from __future__ import annotations

from fastapi import Request
from kaito.runtime.openai_serving import ready_model, ready_tokenizer
from kaito.runtime.protocol import KaitoChatRequest
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import Token
from kaito.runtime.serving import ApiError, Runtime


async def kaito_chat(rt: Runtime, req: KaitoChatRequest, request: Request) -> dict:
    rt.require_ready()
    model, tok = ready_model(rt), ready_tokenizer(rt)
    gk = req.generate_kwargs
    if req.prompt is not None:
        text = (req.prefix or "") + req.prompt
        ids = (await rt.prepare(tok, text))["input_ids"]
        if not ids:
            raise ApiError(400, "prompt is empty; give at least one token of text")
    elif req.messages is not None:
        if not req.messages:
            raise ApiError(400, "Conversational parameter messages required")
        if not tok.chat_template:
            raise ApiError(400, "this model has no chat template; send `prompt` instead of `messages`")
        for i, m in enumerate(req.messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] needs string fields 'role' and 'content'")
        try:
            ids = list(await rt.prepare(
                tok.apply_chat_template, [{"role": m["role"], "content": m["content"]} for m in req.messages],
                add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as e:  # the template's own checks (role order, unknown role)
            raise ApiError(400, f"the chat template rejected these messages: {e}") from None
    elif model.pipeline == "conversational":
        raise ApiError(400, "Conversational parameter messages required")
    else:
        raise ApiError(400, "Text generation parameter prompt required")

    limit = model.max_model_len
    new_tokens = gk.max_new_tokens if gk.max_new_tokens is not None else gk.max_length - len(ids)
    if new_tokens < 1 or len(ids) + new_tokens > limit:
        if req.handle_long_generation == "hole":
            new_tokens = max(1, min(new_tokens, limit - 1))
            keep = limit - new_tokens
            ids = ids[-keep:]
        elif new_tokens < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, which reaches generate_kwargs.max_length "
                                f"{gk.max_length}; raise max_length, set max_new_tokens, or use handle_long_generation='hole'")
        else:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and {new_tokens} new tokens were asked for, over the "
                                f"model's maximum context length of {limit} tokens; shorten the prompt or use "
                                "handle_long_generation='hole'")
    new_tokens = min(new_tokens, rt.settings.max_tokens_cap)
    greedy = not gk.do_sample or gk.temperature == 0
    params = [SamplingParams(
        max_tokens=new_tokens, temperature=0.0 if greedy else gk.temperature, top_k=gk.top_k, top_p=gk.top_p,
        seed=None if gk.seed is None else gk.seed + i, repetition_penalty=gk.repetition_penalty,
        min_tokens=max(0, gk.min_length - len(ids)),
    ) for i in range(gk.num_return_sequences)]
    seqs, queue = rt.submit(ids, params, rt.merged_spec())
    texts = [""] * len(seqs)

    async def gone() -> bool:
        return await request.is_disconnected()

    async for idx, ev in rt.events(seqs, queue, gone):
        if isinstance(ev, Token):
            texts[idx] += ev.text
    if req.clean_up_tokenization_spaces:
        texts = [tok.clean_up_tokenization(t) for t in texts]
    if req.prompt is not None:
        head = req.prompt if req.return_full_text else ""
        return {"Result": "".join(head + t for t in texts)}
    return {"Result": "".join(texts)}
