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

from typing import TYPE_CHECKING

from fastapi import Request
from kaito.runtime.openai_serving import ready_model, ready_tokenizer
from kaito.runtime.protocol import GenerateKwargs, KaitoChatRequest
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import Token
from kaito.runtime.serving import ApiError, Runtime

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


async def kaito_chat(rt: Runtime, req: KaitoChatRequest, request: Request) -> dict:
    rt.require_ready()
    model, tok = ready_model(rt), ready_tokenizer(rt)
    ids = await _prompt_ids(rt, req, tok, model.pipeline)
    ids, new_tokens = _fit_context(ids, req, model.max_model_len)
    params = _sampling_params(req.generate_kwargs, min(new_tokens, rt.settings.max_tokens_cap), len(ids))
    texts = await _generate(rt, ids, params, request)
    if req.clean_up_tokenization_spaces:
        texts = [tok.clean_up_tokenization(t) for t in texts]
    if req.prompt is not None:
        head = req.prompt if req.return_full_text else ""
        return {"Result": "".join(head + t for t in texts)}
    return {"Result": "".join(texts)}


async def _prompt_ids(rt: Runtime, req: KaitoChatRequest, tok: PreTrainedTokenizerBase, pipeline: str) -> list[int]:
    """The token ids of `prefix + prompt`, or of `messages` through the chat template."""
    if req.prompt is not None:
        ids = (await rt.prepare(tok, (req.prefix or "") + req.prompt))["input_ids"]
        if not ids:
            raise ApiError(400, "prompt is empty; give at least one token of text")
        return ids
    if req.messages is None:
        if pipeline == "conversational":
            raise ApiError(400, "Conversational parameter messages required")
        raise ApiError(400, "Text generation parameter prompt required")
    if not req.messages:
        raise ApiError(400, "Conversational parameter messages required")
    if not tok.chat_template:
        raise ApiError(400, "this model has no chat template; send `prompt` instead of `messages`")
    for i, m in enumerate(req.messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] needs string fields 'role' and 'content'")
    try:
        return list(
            await rt.prepare(
                tok.apply_chat_template,
                [{"role": m["role"], "content": m["content"]} for m in req.messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    except Exception as e:  # the template's own checks (role order, unknown role)
        raise ApiError(400, f"the chat template rejected these messages: {e}") from None


def _fit_context(ids: list[int], req: KaitoChatRequest, limit: int) -> tuple[list[int], int]:
    """(prompt ids, new tokens) within the model's context: refused, or with 'hole' cut from the left."""
    gk = req.generate_kwargs
    new_tokens = gk.max_new_tokens if gk.max_new_tokens is not None else gk.max_length - len(ids)
    if new_tokens >= 1 and len(ids) + new_tokens <= limit:
        return ids, new_tokens
    if req.handle_long_generation == "hole":
        new_tokens = max(1, min(new_tokens, limit - 1))
        return ids[-(limit - new_tokens) :], new_tokens
    if new_tokens < 1:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens, which reaches generate_kwargs.max_length "
            f"{gk.max_length}; raise max_length, set max_new_tokens, or use handle_long_generation='hole'",
        )
    raise ApiError(
        400,
        f"the prompt has {len(ids)} tokens and {new_tokens} new tokens were asked for, over the "
        f"model's maximum context length of {limit} tokens; shorten the prompt or use "
        "handle_long_generation='hole'",
    )


def _sampling_params(gk: GenerateKwargs, new_tokens: int, prompt_len: int) -> list[SamplingParams]:
    """One SamplingParams per returned sequence; seeds step by one so the sequences differ."""
    greedy = not gk.do_sample or gk.temperature == 0
    return [
        SamplingParams(
            max_tokens=new_tokens,
            temperature=0.0 if greedy else gk.temperature,
            top_k=gk.top_k,
            top_p=gk.top_p,
            seed=None if gk.seed is None else gk.seed + i,
            repetition_penalty=gk.repetition_penalty,
            min_tokens=max(0, gk.min_length - prompt_len),
        )
        for i in range(gk.num_return_sequences)
    ]


async def _generate(rt: Runtime, ids: list[int], params: list[SamplingParams], request: Request) -> list[str]:
    """Each sequence's text, with every adapter merged; stops early when the client goes away."""
    seqs, queue = rt.submit(ids, params, rt.merged_spec())
    texts = [""] * len(seqs)

    async def gone() -> bool:
        return await request.is_disconnected()

    async for idx, ev in rt.events(seqs, queue, gone):
        if isinstance(ev, Token):
            texts[idx] += ev.text
    return texts
