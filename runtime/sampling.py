"""Per-request sampling for a whole batch of logits.

Called by the engine (`kaito.runtime.engine`) once per step with the logits of
every running row. Each row keeps its own parameters (temperature, top-p,
top-k, penalties, seed); rows with a seed draw from their own generator, so a
seeded request samples the same tokens alone or inside any batch. Greedy rows
(temperature 0) take the argmax.

Any parameter value reaching here is survivable: the HTTP edge validates the
documented ranges, but a row that slips through with an extreme value (a
temperature of 1e-40, a top_p that rounds to 0, a top_k of 1e20, an infinite
penalty) is clamped to a finite meaning, and a row whose distribution still
comes out non-finite takes its most likely token instead of crashing the
batch's `multinomial`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by 1e-40 overflows to inf.
TEMPERATURE_EPS = 1e-5
# Penalties beyond these bounds change nothing more but could overflow float32 (1e308 * count = inf, 0 * inf = NaN).
PENALTY_MAX = 1e6
REPETITION_RANGE = (1e-6, 1e6)
# OpenAI's (and vLLM's) stand-in for a logprob of -inf: JSON has no -inf or NaN.
LOGPROB_FLOOR = -9999.0


def _clamp(x: float, lo: float, hi: float) -> float:
    """x inside [lo, hi]; NaN becomes lo."""
    return lo if not x >= lo else min(x, hi)


def is_greedy(p: "SamplingParams") -> bool:
    """Greedy rows: temperature 0, or so small (or NaN) that sampling would divide by almost nothing."""
    return not p.temperature >= TEMPERATURE_EPS


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
    # Per-row hooks (logit_bias, grammar masks; kaito.runtime.logits): fn(output_ids, row [V] float32) edits the
    # row in place, before penalties and temperature, as vLLM's logits processors do.
    logits_processors: list = field(default_factory=list)


def _penalise(logits: torch.Tensor, rows: list, seqs: list) -> None:
    """Repetition/presence/frequency penalties, in place, only on the rows that ask."""
    for i, seq in rows:
        p = seq.params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            rep = _clamp(p.repetition_penalty, *REPETITION_RANGE)
            seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long, device=row.device)
            if seen.numel():
                s = row.index_select(0, seen)
                s = torch.where(s > 0, s / rep, s * rep)
                row.index_copy_(0, seen, s)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            freq = _clamp(p.frequency_penalty, -PENALTY_MAX, PENALTY_MAX)
            pres = _clamp(p.presence_penalty, -PENALTY_MAX, PENALTY_MAX)
            row -= freq * counts + pres * (counts > 0).to(row.dtype)


def plain_greedy(p: SamplingParams, n_out: int, eos_ids: list[int]) -> bool:
    """A row whose next token is the argmax of its raw logits (no penalty, processor, logprobs or pending
    min_tokens): the batch's one-argmax path here, and the engine's greedy runs (`kaito.runtime.greedy_runs`)."""
    return (is_greedy(p) and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and p.logprobs is None and not p.logits_processors and (not eos_ids or n_out >= p.min_tokens))


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list, eos_ids: list[int]) -> tuple[list[int], list]:
    """Pick one token per row. logits: [B, V]. Returns (token ids, per-row logprob info or None).

    When every row is plain greedy (no penalties, logprobs or pending min_tokens) the whole batch is one
    argmax; otherwise the general path below applies each row's parameters (same tokens for greedy rows).
    """
    if all(plain_greedy(s.params, len(s.output_ids), eos_ids) for s in seqs):
        return logits.float().argmax(-1).tolist(), [None] * len(seqs)
    return sample_general(logits, seqs, eos_ids)


@torch.inference_mode()  # logits are inference tensors: in-place masking needs the same mode
def sample_general(logits: torch.Tensor, seqs: list, eos_ids: list[int]) -> tuple[list[int], list]:
    """Every row's own temperature, top-k/top-p, penalties, min_tokens, seed and logprobs. logits: [B, V]."""
    logits = _adjusted(logits, seqs, eos_ids)
    greedy_rows = [is_greedy(s.params) for s in seqs]
    tokens = logits.argmax(-1)
    if not all(greedy_rows):
        greedy = torch.tensor(greedy_rows, device=logits.device)
        tokens = torch.where(greedy, tokens, _sampled(logits, seqs, greedy_rows))
    token_list = tokens.tolist()
    return token_list, _logprob_infos(logits, seqs, token_list)


def _adjusted(logits: torch.Tensor, seqs: list, eos_ids: list[int]) -> torch.Tensor:
    """float32 logits after each row's logits processors, penalties and min_tokens (EOS masked), with NaN
    made -inf; the input is never modified."""
    logits = logits.float()
    V = logits.shape[1]
    needs = [(i, s) for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty]
    hooked = [(i, s) for i, s in enumerate(seqs) if s.params.logits_processors]
    if needs or hooked:
        logits = logits.clone()
    for i, s in hooked:
        for fn in s.params.logits_processors:
            fn(s.output_ids, logits[i])
    if needs:
        _penalise(logits, needs, seqs)
    eos_ids = [e for e in eos_ids if 0 <= e < V]
    for i, s in enumerate(seqs):
        if eos_ids and len(s.output_ids) < s.params.min_tokens:
            logits[i, eos_ids] = float("-inf")
    # NaN (a broken row, an inf - inf) never wins an argmax nor reaches multinomial; +inf stays the top token.
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _sampled(logits: torch.Tensor, seqs: list, greedy_rows: list[bool]) -> torch.Tensor:
    """A token drawn for each non-greedy row [B] (greedy rows' entries are meaningless)."""
    temps = torch.tensor([1.0 if g else min(s.params.temperature, 1e30) for g, s in zip(greedy_rows, seqs)],
                         dtype=logits.dtype, device=logits.device)
    probs, order = _filtered_probs(logits / temps.unsqueeze(1), seqs)
    picked = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)  # greedy rows' entries are gathered too
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None and not greedy_rows[i]]
    if unseeded:
        idx = torch.tensor(unseeded, device=logits.device)
        picked[idx] = torch.multinomial(probs.index_select(0, idx), 1).squeeze(1)
    for i, s in enumerate(seqs):
        if s.generator is not None and not greedy_rows[i]:
            picked[i] = torch.multinomial(probs[i].cpu(), 1, generator=s.generator).to(logits.device)[0]
    return order.gather(1, picked.unsqueeze(1)).squeeze(1)


def _filtered_probs(x: torch.Tensor, seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-k/top-p distribution over its tokens sorted by logit: (probs [B, V], token order [B, V])."""
    V = x.shape[1]
    # Bounded in Python first: a top_k of 1e20 overflows int64, a NaN top_p keeps only the top token.
    top_k = torch.tensor([int(min(s.params.top_k, V)) if s.params.top_k > 0 else V for s in seqs], device=x.device)
    top_p = torch.tensor([_clamp(s.params.top_p, 0.0, 1.0) for s in seqs], dtype=x.dtype, device=x.device)
    sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=x.device).unsqueeze(0)
    sorted_x = sorted_x.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_x.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill((before >= top_p.unsqueeze(1)) & (ranks > 0), 0.0)
    mass = probs.sum(-1, keepdim=True)
    # A row with no finite mass left (every logit -inf) takes its top token rather than failing multinomial.
    dead = ~(mass > 0) | ~torch.isfinite(mass)
    return torch.where(dead, (ranks == 0).to(probs.dtype), probs / mass.clamp(min=1e-38)), order


def _logprob_infos(logits: torch.Tensor, seqs: list, token_list: list[int]) -> list:
    """Per row: None, or (chosen token's logprob, [(token, logprob)] of its top `logprobs` alternatives)."""
    V = logits.shape[1]
    infos: list = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        lp = logits.index_select(0, torch.tensor(want, device=logits.device)).log_softmax(-1)
        lp = lp.nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
        for j, i in enumerate(want):
            k = min(max(0, int(seqs[i].params.logprobs)), V)
            chosen = float(lp[j, token_list[i]])
            top = []
            if k:
                vals, ids = lp[j].topk(k)
                top = list(zip(ids.tolist(), vals.tolist()))
            infos[i] = (chosen, top)
    return infos
