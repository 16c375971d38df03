"""The model side of continuous batching: a padded batched KV cache and the forwards over it.

Called by the engine (`kaito.runtime.engine`) on rank 0 and by worker ranks
(`kaito.runtime.distributed`) replaying the same plan, so every rank holds the
same cache. The running batch keeps one KV tensor per layer, [B, heads, L, dim],
left-padded: row i's real tokens are the last ones, `mask[i]` marks them. Each
sequence keeps its own positions (`pos`), so padding never shifts RoPE and a
row decodes the same tokens alone or in a full batch. Admitting sequences
prefills them together, then pads the shorter side and concatenates on the
batch axis; evicting keeps the surviving rows and drops columns that became
padding for everyone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from kaito.runtime.lora import LoraManager, RowSpec
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 128  # spare KV columns per buffer, so decode steps write in place instead of re-concatenating


class _BufferedLayer(DynamicLayer):
    """A cache layer over a preallocated [B, H, capacity, D] buffer: update() writes in place."""

    def __init__(self, bk: torch.Tensor, bv: torch.Tensor, n: int):
        super().__init__()
        self.bk, self.bv, self.n = bk, bv, n
        self.keys, self.values = bk[:, :, :n], bv[:, :, :n]
        self.is_initialized, self.device, self.dtype = True, bk.device, bk.dtype

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[-2]
        self.bk[:, :, self.n:self.n + t] = key_states
        self.bv[:, :, self.n:self.n + t] = value_states
        self.n += t
        self.keys, self.values = self.bk[:, :, :self.n], self.bv[:, :, :self.n]
        return self.keys, self.values


def _with_room(k: torch.Tensor, width: int, offset: int, rows: int, row0: int, out=None, extra: int = HEADROOM):
    """Place k [b, H, l, D] right-aligned at column `width` (rows row0..) of a zeroed buffer with spare room."""
    if out is None:
        out = k.new_zeros(rows, k.shape[1], width + extra, k.shape[3])
    out[row0:row0 + k.shape[0], :, offset:width] = k
    return out


class BatchExecutor:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.lora = LoraManager(model)
        # transformers 5 renamed the cache argument; accept both spellings.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: ([B,H,L,D], [B,H,L,D])
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, L]
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [B] next position of each row
        self.rows: list[RowSpec] = []

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def _forward(self, input_ids, attention_mask, position_ids, kv, rows: list[RowSpec]):
        # No config: plain full-attention layers everywhere, so sliding-window models never crop our
        # padded columns; their window is still applied by the mask on column distances.
        cache = DynamicCache()
        if kv:
            cache.layers = [_BufferedLayer(bk, bv, self.width) for bk, bv in kv]
        self.lora.set_rows(rows)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kw: cache},
            )
        finally:
            self.lora.set_rows([])
        new_cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None) or cache
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in new_cache.layers]

    @torch.inference_mode()
    def evict(self, keep: list[int]) -> None:
        """Keep only these rows (in this order) and drop all-padding columns on the left."""
        if keep == list(range(self.batch_size)):
            return
        if not keep:
            self.kv, self.rows = [], []
            self.mask = self.mask[:0, :0]
            self.pos = self.pos[:0]
            return
        idx = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, idx)
        self.pos = self.pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        live = self.mask.any(0).nonzero()
        start = int(live[0]) if live.numel() else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        # Slicing the front keeps the buffers' spare room at the end.
        self.kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in self.kv]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], rows: list[RowSpec]) -> torch.Tensor:
        """Run new prompts (left-padded together), add them to the batch; returns their last logits [n, V]."""
        n, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, L, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, L, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, kv = self._forward(ids, mask, position_ids, None, rows)
        pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        self._merge(kv, mask, pos, rows)
        return logits

    def _merge(self, kv, mask, pos, rows) -> None:
        """Join prefilled rows (tight [n, H, l, D] tensors) to the batch, right-aligned, in fresh roomy buffers."""
        la, lb = self.width if self.rows else 0, mask.shape[1]
        width, ba, bb = max(la, lb), len(self.rows), len(rows)
        merged = []
        for layer, (kb, vb) in enumerate(kv):
            nk = _with_room(kb, width, width - lb, ba + bb, ba)
            nv = _with_room(vb, width, width - lb, ba + bb, ba)
            if ba:
                ka, va = self.kv[layer]
                _with_room(ka[:, :, :la], width, width - la, ba + bb, 0, out=nk)
                _with_room(va[:, :, :la], width, width - la, ba + bb, 0, out=nv)
            merged.append((nk, nv))
        self.kv = merged
        old_mask = F.pad(self.mask, [width - la, 0]) if ba else mask.new_zeros(0, width)
        self.mask = torch.cat([old_mask, F.pad(mask, [width - lb, 0])])
        self.pos = torch.cat([self.pos, pos]) if ba else pos
        self.rows = self.rows + list(rows)

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns next-token logits [B, V]."""
        B = self.batch_size
        if self.kv and self.kv[0][0].shape[2] <= self.width:  # out of room: regrow (rare, amortised)
            self.kv = [(_with_room(k[:, :, :self.width], self.width, 0, B, 0), _with_room(v[:, :, :self.width], self.width, 0, B, 0))
                       for k, v in self.kv]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(B, 1)
        attn = torch.cat([self.mask, torch.ones(B, 1, dtype=torch.long, device=self.device)], 1)
        logits, _ = self._forward(ids, attn, self.pos.view(B, 1), self.kv, self.rows)
        self.mask = attn  # the buffers were written in place at column `width`
        self.pos = self.pos + 1
        return logits

    def apply(self, plan: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One scheduler step, identical on every rank: evict, decode the survivors, then prefill admissions.

        Returns (decode logits [B, V] or None, prefill logits [n, V] or None).
        """
        for op in plan.get("ops", []):  # adapter changes, replayed on worker ranks
            if op[0] == "load":
                from kaito.runtime.lora import read_adapter

                self.lora.add(read_adapter(op[2], op[1], self.model))
            else:
                self.lora.remove(op[1])
        self.evict(plan["keep"])
        dec = self.decode(plan["decode"]) if plan["decode"] else None
        pre = None
        if plan["prefill"]:
            pre = self.prefill([p for p, _ in plan["prefill"]], [tuple(tuple(x) for x in r) for _, r in plan["prefill"]])
        return dec, pre
