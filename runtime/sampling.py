"""Per-request sampling for a whole batch of logits.

Called by the engine (`kaito.runtime.engine`) once per step with the logits of
every running row. Each row keeps its own parameters (temperature, top-p,
top-k, penalties, seed); rows with a seed draw from their own generator, so a
seeded request samples the same tokens alone or inside any batch. Greedy rows
(temperature 0) take the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once per generated token id
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob and top-k alternatives


def _penalise(logits: torch.Tensor, rows: list, seqs: list) -> None:
    """Repetition/presence/frequency penalties, in place, only on the rows that ask."""
    for i, seq in rows:
        p = seq.params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long, device=row.device)
            if seen.numel():
                s = row.index_select(0, seen)
                s = torch.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
                row.index_copy_(0, seen, s)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _plain_greedy(p: SamplingParams, n_out: int, eos_ids: list[int]) -> bool:
    return (p.temperature <= 0 and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and p.logprobs is None and (not eos_ids or n_out >= p.min_tokens))


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list, eos_ids: list[int]) -> tuple[list[int], list]:
    """Pick one token per row. logits: [B, V]. Returns (token ids, per-row logprob info or None).

    When every row is plain greedy (no penalties, logprobs or pending min_tokens) the whole batch is one
    argmax; otherwise the general path below applies each row's parameters (same tokens for greedy rows).
    """
    if all(_plain_greedy(s.params, len(s.output_ids), eos_ids) for s in seqs):
        return logits.float().argmax(-1).tolist(), [None] * len(seqs)
    return sample_general(logits, seqs, eos_ids)


@torch.inference_mode()  # logits are inference tensors: in-place masking needs the same mode
def sample_general(logits: torch.Tensor, seqs: list, eos_ids: list[int]) -> tuple[list[int], list]:
    """Every row's own temperature, top-k/top-p, penalties, min_tokens, seed and logprobs. logits: [B, V]."""
    logits = logits.float()
    B, V = logits.shape
    needs = [(i, s) for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty]
    if needs:
        logits = logits.clone()
        _penalise(logits, needs, seqs)
    for i, s in enumerate(seqs):
        if eos_ids and len(s.output_ids) < s.params.min_tokens:
            logits[i, eos_ids] = float("-inf")

    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=logits.device)
    greedy = temps <= 0
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        x = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else V for s in seqs], device=x.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=x.dtype, device=x.device)
        sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(V, device=x.device).unsqueeze(0)
        sorted_x = sorted_x.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        probs = sorted_x.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p.unsqueeze(1), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        picked = torch.empty(B, dtype=torch.long, device=x.device)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None and not bool(greedy[i])]
        if unseeded:
            idx = torch.tensor(unseeded, device=x.device)
            picked[idx] = torch.multinomial(probs.index_select(0, idx), 1).squeeze(1)
        for i, s in enumerate(seqs):
            if s.generator is not None and not bool(greedy[i]):
                picked[i] = torch.multinomial(probs[i].cpu(), 1, generator=s.generator).to(x.device)[0]
        sampled = order.gather(1, picked.clamp(min=0).unsqueeze(1)).squeeze(1)
        tokens = torch.where(greedy, tokens, sampled)

    token_list = tokens.tolist()
    infos: list = [None] * B
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        lp = logits.index_select(0, torch.tensor(want, device=logits.device)).log_softmax(-1)
        for j, i in enumerate(want):
            k = seqs[i].params.logprobs
            chosen = float(lp[j, token_list[i]])
            top = []
            if k:
                vals, ids = lp[j].topk(k)
                top = list(zip(ids.tolist(), vals.tolist()))
            infos[i] = (chosen, top)
    return token_list, infos
