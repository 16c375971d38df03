"""The model side of continuous batching: a padded batched KV cache and the forwards over it.

Called by the engine (`kaito.runtime.engine`) on rank 0 and by worker ranks
(`kaito.runtime.distributed.Replayer`) replaying the same plans, so every rank
holds the same cache. Per layer the cache is one reusable buffer [rows, heads, columns,
dim]; rows 0..B-1 are the running batch and columns off..off+width its
left-padded window: row i's real tokens are the last ones, `mask[i]` marks them.
Each sequence keeps its own positions (`pos`), so padding never shifts RoPE and a
row decodes the same tokens alone or in a full batch. Admitting sequences
prefills them together and writes their rows below the batch in place;
evicting moves only the rows that fill holes and drops columns that became
padding for everyone; nothing copies the whole batch's cache per step. Decode
uses `kaito.runtime.fastpath` when the architecture allows it, else
transformers' forward.
"""

from __future__ import annotations

import inspect
import os

import torch
from kaito.runtime.fastpath import FastDecoder
from kaito.runtime.lora import LoraManager, RowSpec
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def fresh_buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised K/V buffer (see `BatchExecutor._realloc`); tests swap it for one filled with NaN."""
    return like.new_empty(shape)


HEADROOM = 128  # spare KV columns per buffer, so decode steps write in place instead of re-concatenating


class _BufferedLayer(DynamicLayer):
    """A cache layer over a preallocated [B, H, capacity, D] buffer view: update() writes in place."""

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


def _layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a forward left in one layer of its cache."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"reading the KV cache after a forward: a {type(layer).__name__} layer holds no keys and "
                        "values (only attention layers fit the batch cache; this architecture is not supported)")
    return keys, values


class BatchExecutor:
    """The batch's KV lives in per-layer buffers [row capacity, H, column capacity, D] that are reused:
    rows 0..B-1 are the running batch, columns off..off+width its (left-padded) window. Admissions write
    their rows in place and evictions move only the rows that shift, so a step never copies the whole
    batch's cache (a full copy per admission used to cost more than a decode step)."""

    def __init__(self, model: torch.nn.Module, compile_decode: bool = False):
        self.model = model
        self.device = next(model.parameters()).device
        self.lora = LoraManager(model)
        # transformers 5 renamed the cache argument; accept both spellings.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Prefill needs only the last position's logits: skip the LM head on every other prompt token.
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # KAITO_FAST_DECODE=0 forces transformers' forward for every decode (A/B checks, debugging).
        fast_ok = os.environ.get("KAITO_FAST_DECODE", "1") != "0"
        self.fast = FastDecoder.build(model, compile_decode) if fast_ok else None
        self.bufs: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: ([R, H, C, D], [R, H, C, D])
        self.mask_buf = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [R, C]; 1 = real token
        self.off = 0  # first column of the batch's window in the buffers
        self.width = 0
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [B] next position of each row
        self.rows: list[RowSpec] = []

    def concurrent_prefill_ok(self) -> bool:
        """Whether `prefill_forward` may run on another thread during `decode`: only for the architectures
        of our fast path (their modules keep no per-call state), and not when the rotary embedding swaps
        its frequencies by sequence length (dynamic NTK, LongRoPE), a module-level state that two forwards
        of different lengths would race on."""
        if self.fast is None:
            return False
        inner = getattr(self.model, "model", None)
        rotary = getattr(inner, "rotary_emb", None)
        return getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope")

    def idle_layout(self) -> bool:
        """While the engine idles: one decoder layer's linears toward the dense layout a lone request decodes
        fastest on (`LayoutSwitch.idle`); returns whether layers remain. Only while nothing else runs forwards."""
        return self.fast is not None and self.fast.layout.idle()

    @property
    def idle_layout_pending(self) -> bool:
        """Whether `idle_layout` has layers left to turn dense (the engine then wakes to do so while idle)."""
        return self.fast is not None and self.fast.layout.idle_pending

    def freeze_layout(self) -> None:
        """Keep the linears' CPU weight layout as it is from now on (`kaito.runtime.packing.LayoutSwitch`):
        for when another thread runs forwards beside `decode`, which would race with a switch."""
        if self.fast is not None:
            self.fast.layout.enabled = False

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_buf[:self.batch_size, self.off:self.off + self.width]

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ([B, H, width, D], [B, H, width, D]) views of the batch's cache."""
        B, a, b = self.batch_size, self.off, self.off + self.width
        return [(k[:B, :, a:b], v[:B, :, a:b]) for k, v in self.bufs]

    def _forward(self, input_ids, attention_mask, position_ids, rows: list[RowSpec], cached: bool, **kw):
        # No config: plain full-attention layers everywhere, so sliding-window models never crop our
        # padded columns; their window is still applied by the mask on column distances.
        cache = DynamicCache()
        if cached:
            B, a = input_ids.shape[0], self.off
            cache.layers = [_BufferedLayer(k[:B, :, a:], v[:B, :, a:], self.width) for k, v in self.bufs]
        self.lora.set_rows(rows)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kw: cache},
                **kw,
            )
        finally:
            self.lora.set_rows([])
        new_cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None) or cache
        return out.logits[:, -1, :], [_layer_kv(layer) for layer in new_cache.layers]

    def _realloc(self, rows: int, width: int, place: int, like: list[torch.Tensor] | None = None) -> None:
        """Fresh buffers with room for `rows` rows and `width` + HEADROOM columns; the current window is
        copied so that it ends at column `place` (a wider admission then finds room on its left).
        `like`: per-layer tensors giving the shapes when the batch is empty.

        The K/V buffers are not zeroed (`fresh_buffer`): every column a forward reads is written first (a
        merge writes or zeroes its rows' window, a decode its new column, a wider merge zeroes the old rows'
        new columns), and zeroing the whole capacity cost the first burst of 32 prompts on the 88M bench
        model 105 ms of its time to first token (340 MB of buffers, most of them headroom never read)."""
        B = self.batch_size
        rows = max(rows, self.bufs[0][0].shape[0] if self.bufs else 1)
        cap_r = 1 << (rows - 1).bit_length()  # powers of two: a growing batch reallocates rarely
        cols = width + HEADROOM
        old = self.kv if self.bufs else []
        shapes = [k for k, _ in old] if old else like
        if shapes is None:
            raise ValueError("allocating the KV buffers of an empty batch: pass `like` (per-layer K tensors)")
        bufs = []
        for i, ref in enumerate(shapes):
            nk = fresh_buffer(ref, (cap_r, ref.shape[1], cols, ref.shape[3]))
            nv = fresh_buffer(ref, (cap_r, ref.shape[1], cols, ref.shape[3]))
            if old and B:
                nk[:B, :, place - self.width:place] = old[i][0]
                nv[:B, :, place - self.width:place] = old[i][1]
            bufs.append((nk, nv))
        mask = torch.zeros(cap_r, cols, dtype=torch.long, device=self.device)
        if B:
            mask[:B, place - self.width:place] = self.mask
        self.bufs, self.mask_buf, self.off = bufs, mask, place - self.width

    def _slide_left(self) -> None:
        """Move the window to column 0 of the same buffers. Evictions drop columns on the left, so under a
        steady stream of requests the window drifts right while its width stays put: sliding it back copies
        only the batch's rows, where a regrow zeroed and copied every buffer's full capacity (measured: 9%
        of the engine thread at 32 clients on the 88M bench model)."""
        B, a, w = self.batch_size, self.off, self.width
        for k, v in self.bufs:
            k[:B, :, :w] = k[:B, :, a:a + w].clone()  # clone: the two ranges may overlap
            v[:B, :, :w] = v[:B, :, a:a + w].clone()
        self.mask_buf[:B, :w] = self.mask_buf[:B, a:a + w].clone()
        self.off = 0

    def reset(self) -> None:
        """Drop the batch and its buffers (after a failed step, whose cache contents are suspect)."""
        self.bufs, self.rows, self.width, self.off = [], [], 0, 0
        self.mask_buf = self.mask_buf[:0, :0]
        self.pos = self.pos[:0]

    @torch.inference_mode()
    def evict(self, keep: list[int]) -> None:
        """Keep only these rows, in this order (row j becomes old row keep[j]); drop all-padding columns on the left.

        Only rows whose index changes are copied (the engine fills holes with the last rows)."""
        B = self.batch_size
        if keep == list(range(B)):
            return
        if not keep:
            # The buffers stay for the next admissions (no re-allocation per wave of requests); the
            # window restarts near their right end so prompts up to capacity - HEADROOM fit in place.
            self.rows, self.width, self.pos = [], 0, self.pos[:0]
            self.off = max(0, self.bufs[0][0].shape[2] - HEADROOM) if self.bufs else 0
            return
        moved = [(j, i) for j, i in enumerate(keep) if j != i]
        if moved:
            dst = torch.tensor([j for j, _ in moved], device=self.device)
            src = torch.tensor([i for _, i in moved], device=self.device)
            a, b = self.off, self.off + self.width
            for k, v in self.bufs:
                k[dst, :, a:b] = k[src, :, a:b]
                v[dst, :, a:b] = v[src, :, a:b]
            self.mask_buf[dst, a:b] = self.mask_buf[src, a:b]
            self.pos = self.pos.index_select(0, torch.tensor(keep, device=self.device))
        else:
            self.pos = self.pos[:len(keep)]
        self.rows = [self.rows[i] for i in keep]
        live = self.mask.any(0).nonzero()
        start = int(live[0]) if live.numel() else self.width
        self.off += start
        self.width -= start

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], rows: list[RowSpec]) -> torch.Tensor:
        """Run new prompts (left-padded together), add them to the batch; returns their last logits [n, V]."""
        logits, kv, mask, pos = self.prefill_forward(prompts, rows)
        self.merge(kv, mask, pos, rows)
        return logits

    @torch.inference_mode()
    def prefill_forward(self, prompts: list[list[int]], rows: list[RowSpec]):
        """The prompts' forward alone: (last logits [n, V], per-layer K/V, pad mask, next positions).

        Touches no batch state, so the engine's prefill thread runs it while the engine thread decodes;
        `merge` then adds the rows to the batch between two decode steps."""
        n, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, L, dtype=torch.long)
        mask = torch.zeros(n, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.fast is not None and self.fast.usable(L):
            self.lora.set_rows(list(rows))
            try:
                logits, kv = self.fast.prefill(ids, position_ids, mask)
            finally:
                self.lora.set_rows([])
        else:
            logits, kv = self._forward(ids, mask, position_ids, rows, False, **self._keep_kw)
        pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        return logits, kv, mask, pos

    @torch.inference_mode()
    def merge(self, kv, mask, pos, rows: list[RowSpec]) -> None:
        """Write prefilled rows (tight [n, H, l, D] tensors) below the batch, right-aligned at its window's end.

        Every masked column inside the window is zero, as in a fresh buffer: rows and columns are reused,
        and a stale non-finite value there would poison attention even at weight 0."""
        ba, bb, lb = self.batch_size, len(rows), mask.shape[1]
        width = max(self.width, lb)
        end = self.off + self.width  # the window's right edge stays; a wider prompt extends it leftwards
        if not self.bufs or ba + bb > self.bufs[0][0].shape[0] or end - width < 0:
            self._realloc(ba + bb, width, width, like=[k for k, _ in kv])
            end = width
        a = end - width
        for (k, v), (kb, vb) in zip(self.bufs, kv):
            if width > self.width and ba:  # columns joining the window on the left: padding for old rows
                k[:ba, :, a:end - self.width] = 0
                v[:ba, :, a:end - self.width] = 0
            k[ba:ba + bb, :, a:end - lb] = 0
            v[ba:ba + bb, :, a:end - lb] = 0
            k[ba:ba + bb, :, end - lb:end] = kb
            v[ba:ba + bb, :, end - lb:end] = vb
        if width > self.width and ba:
            self.mask_buf[:ba, a:end - self.width] = 0
        self.mask_buf[ba:ba + bb, a:end - lb] = 0
        self.mask_buf[ba:ba + bb, end - lb:end] = mask
        self.off, self.width = a, width
        self.pos = torch.cat([self.pos, pos]) if ba else pos
        self.rows = self.rows + list(rows)

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to each of the first len(tokens) rows; returns their next-token logits [n, V].

        Rows after them (admitted this step, already past their prompt) only get a zero padding column.
        """
        B, n = self.batch_size, len(tokens)
        if self.off + self.width >= self.bufs[0][0].shape[2]:  # out of room on the right
            if self.bufs[0][0].shape[2] - self.width >= HEADROOM // 2:
                self._slide_left()
            else:  # regrow (rare, amortised)
                self._realloc(B, self.width, self.width)
        col = self.off + self.width
        self.mask_buf[:n, col] = 1
        if B > n:
            self.mask_buf[n:B, col] = 0
            for k, v in self.bufs:
                k[n:B, :, col] = 0
                v[n:B, :, col] = 0
        ids = torch.tensor(tokens, dtype=torch.long).view(n, 1).to(self.device)
        attn = self.mask_buf[:n, self.off:col + 1]
        rows = self.rows[:n] if B > n else self.rows
        if self.fast is not None and self.fast.usable(self.width):
            self.lora.set_rows(rows)
            try:
                m = attn.bool()
                # As transformers does: no mask at all when no row has padding.
                mask = None if bool(m.all()) else m[:, None, None, :]
                # Views ending at the new column, not at the buffer's end: a compiled step (compile_decode) then
                # sees the same stride pattern whether or not the window starts at column 0 (a view reaching
                # the buffer's end at column 0 looked contiguous, a guard failure and a recompile).
                kv = [(k[:n, :, self.off:col + 1], v[:n, :, self.off:col + 1]) for k, v in self.bufs]
                logits = self.fast.forward(ids, self.pos[:n].view(n, 1), mask, kv, self.width, self.lora.active)
            finally:
                self.lora.set_rows([])
        else:
            logits, _ = self._forward(ids, attn, self.pos[:n].view(n, 1), rows, True)
        self.width += 1  # the buffers were written in place at column `col`
        self.pos[:n] += 1
        return logits

    @torch.inference_mode()
    def greedy_run(self, tokens: list[int], k: int, eos_ids: list[int], eos_stops: list[bool], budget_s: float,
                   interrupt, watch=None) -> list[list[int]] | None:
        """Up to k greedy decode steps of every row in one C call (`FastDecoder.greedy_run`; the engine's
        `kaito.runtime.greedy_runs` picks when and k): each row's next token is its argmax, fed to the next step. Returns
        each step's tokens ([steps][rows]), or None when the fast path cannot run it now (nothing changed: the
        caller decodes one step instead). The batch advances by the steps run. eos_stops[i]: row i ends at one of
        `eos_ids`, so the run stops after that step; `interrupt` (a ctypes int another thread may set) and
        `budget_s` end it early too (see `kaito_decode_run`). watch(picks), when given, sees the picks tensor the C
        loop fills step by step just before it starts (`kaito.runtime.greedy_runs.RunStreamer`)."""
        B, n = self.batch_size, len(tokens)
        if self.fast is None or n != B or k < 1 or any(self.rows) or not self.fast.runnable(n, self.width + k):
            return None
        cap = self.bufs[0][0].shape[2]
        if self.off + self.width + k > cap:  # as decode: slide back to column 0, else regrow
            if cap - self.width >= max(k, HEADROOM // 2):
                self._slide_left()
            else:
                self._realloc(B, self.width, self.width)
            k = min(k, self.bufs[0][0].shape[2] - self.off - self.width)
        a, col = self.off, self.off + self.width
        old = self.mask_buf[:n, a:col].bool()
        # As decode: no mask when no row has padding; the run's own columns are real for every row.
        mask = None if bool(old.all()) else torch.cat([old, old.new_ones(n, k)], 1)
        kv = [(kb[:n, :, a:col + k], vb[:n, :, a:col + k]) for kb, vb in self.bufs]
        eos = torch.tensor(eos_ids, dtype=torch.long)
        stops = torch.tensor(eos_stops, dtype=torch.uint8)
        picks = self.fast.greedy_run(tokens, self.pos[:n], mask, kv, self.width, k, eos, stops, budget_s, interrupt,
                                     watch)
        if picks is None:
            return None
        steps = len(picks)
        self.mask_buf[:n, col:col + steps] = 1
        self.width += steps
        self.pos[:n] += steps
        return picks

    @property
    def compiled(self) -> bool:
        """Whether decode steps without adapters run through torch.compile (`compile_decode`)."""
        return self.fast is not None and self.fast.compiled is not None

    def warmup(self, token: int) -> None:
        """Compile the decode graphs a server meets (one row; several rows with and without padding) before
        it serves, so no request waits for a compile; the batch is left empty. No-op unless compiled."""
        if not self.compiled or self.batch_size:
            return
        self.prefill([[token] * 3, [token] * 5], [(), ()])  # two rows, the first padded: a mask
        self.decode([token, token])
        self.decode([token, token])
        self.evict([1])  # one row: no mask, and dynamo specializes a batch of one
        self.decode([token])
        self.prefill([[token] * self.width], [()])  # two rows of one width: several rows, no mask
        self.decode([token, token])
        self.evict([])

    @torch.inference_mode()
    def undo_decode(self, n: int) -> None:
        """Take back the last `decode` of the first n rows (a worker rank whose copy of a forward succeeded
        where rank 0's failed): its column leaves the window, and the next decode writes it again."""
        self.width -= 1
        self.pos[:n] -= 1
