"""The whole float32 decode step in one C call (`kaito_decode_step` in decode_glue.c), for dense weights.

Called by `kaito.runtime.fastpath.FastDecoder.forward` on CPU when every linear of the model is a plain dense
float32 `torch.nn.Linear` without hooks (the layout switch has turned them dense: up to DENSE_ROWS rows a step) and the
glue shares torch's OpenMP team. The runtime only.

Why: a batch-1 step of the 88M bench model spent 10.7 ms in its 49 GEMVs (MKL, two threads, at the machine's
GEMV bandwidth) and 13.9 ms in all, with the glue between them already in C: the other 3 ms were ~100 Python
calls a step (each a ctypes or torch dispatch, each waking the OpenMP team again) and attention. Here the step
is one parallel region: each projection's output rows are split over the team (every thread streams its own
part of the weight, as MKL's GEMV does), the attention its (row, kv head) items, with a barrier between, and
the embedding lookup and the rotary tables stay torch's (the model's own modules, so every RoPE scaling
variant keeps its math).

`DecodeStep.run_greedy` runs up to k such steps in one call for rows that decode greedily (`kaito_decode_run`):
each step's argmax is embedded in C as the next step's input, the rotary tables of all k positions come from
one call of the model's rotary module (`rope_batchable` says when that equals k calls). The engine's greedy
runs use it (`kaito.runtime.engine`): a batch-1 step of the 3.7M bench model took 0.31-0.33 ms in a run against
0.62-0.80 ms for a step through `run` with the executor's Python around it.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
from kaito.runtime import cglue

if TYPE_CHECKING:
    from kaito.runtime.fastpath import _Layer, _Norm

# Rows a step may have (STEP_ROWS in decode_glue.c). The step reads each weight row once for all rows of the
# batch, from L1, four weight rows at a time; against oneDNN's packed weights (ms per step, 2 threads, 160
# columns): 88M bench model 3 rows 16.8 vs 18.2, 4 rows 18.8 vs 19.6, 8 rows 24.6 vs 24.6, 16 rows 39.0 vs 34.2,
# 32 rows 60.6 vs 50.7; 3.7M model 4 rows 0.62 vs 1.10, 8 rows 0.81 vs 1.44, 32 rows 2.58 vs 3.06.
MAX_ROWS = 64
# The layout switch's dense threshold while this step runs: up to 8 rows the step ties or beats the packed
# weights in-process on both hosts measured (88M model, 8 rows: 24.6 vs 24.6 ms on one, 25.8 vs 32-41 on a
# noisier one, where 16 rows was 42.5 vs 46-47 but 32 rows 71-86 vs 66-80). Served on the noisier host, 8 clients
# (two rounds each, interleaved): 232-239 tok/s and TPOT p50 30-32 ms at 8, against 149-182 and 41-54 at 2;
# 32 clients the same (365-403 against 390-398 tok/s). 64 (never packing in decode) lost at 32 clients.
DENSE_ROWS = 8
PTRS = 18  # pointers per layer in the C table (L_PTRS in decode_glue.c)
_KV = (16, 17)  # where the layer's K and V cache pointers go


def _dense(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_contiguous()
            and (m.bias is None or m.bias.is_contiguous()))


def _w(m: torch.nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


def _b(m: torch.nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _ptr(t: torch.Tensor | None, offset: int = 0) -> int | None:
    return None if t is None else t.data_ptr() + 4 * offset


class DecodeStep:
    """The pointer table of one model for `kaito_decode_step`, rebuilt when a weight tensor changes (the
    layout switch packing or unpacking a layer); `run` is None-returning when the model is not all dense."""

    def __init__(self, glue: cglue.CpuGlue, layers: list[_Layer], final_norm: _Norm,
                 lm_head: torch.nn.Module):
        self.glue, self.layers, self.final_norm, self.lm_head = glue, layers, final_norm, lm_head
        first = layers[0]
        self.head_dim = first.head_dim
        self.heads, self.kv_heads = first.q_width // first.head_dim, first.k_width // first.head_dim
        self.hidden = int(_w(first.o).shape[0])
        self.linears = [m for layer in layers for m in (*layer.qkv, layer.o, *layer.gate_up, layer.down)] + [lm_head]
        self.inter = 0
        self._weights: list[torch.Tensor] = []
        self._table: ctypes.Array[ctypes.c_void_p] | None = None
        self._eps = (ctypes.c_float * (2 * len(layers) + 1))(
            *[e for layer in layers for e in (layer.norm_in.variance_epsilon, layer.norm_post.variance_epsilon)],
            final_norm.variance_epsilon)
        self._scaling = (ctypes.c_float * len(layers))(*[layer.scaling for layer in layers])

    def ready(self) -> bool:
        """Whether every linear is dense and hook-free now (checked each step: a layer switch swaps weight
        tensors, an adapter load adds hooks, which this step would not run)."""
        weights = self._weights
        if weights:
            for m, w in zip(self.linears, weights):
                if m.weight is not w or m._forward_hooks or m._forward_pre_hooks:
                    break
            else:
                return True  # _weights is only kept beside a built table
        self._table = self._build()
        # Kept only for a table built: a model turned away (hooks, packed weights) is asked again next step.
        self._weights = [_w(m) for m in self.linears] if self._table is not None else []
        return self._table is not None

    def _build(self) -> ctypes.Array[ctypes.c_void_p] | None:
        # Asked every step while the model is packed or hooked: the first packed linear ends it.
        if not all(_dense(m) for m in self.linears) or self.lm_head.bias is not None:
            return None
        norms = [nm.weight for layer in self.layers for nm in (layer.norm_in, layer.norm_post)]
        norms.append(self.final_norm.weight)
        if not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
            return None
        table = (ctypes.c_void_p * (PTRS * len(self.layers)))()
        inter = set()
        for i, layer in enumerate(self.layers):
            row = _layer_ptrs(layer, self.hidden)
            if row is None:
                return None
            inter.add(row[1])
            table[i * PTRS:(i + 1) * PTRS] = row[0]
        if len(inter) != 1:
            return None
        self.inter = inter.pop()
        return table

    def _bind(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, ...] | None:
        """Put the layers' K/V cache pointers in the table; their (row, head) strides, or None when they differ
        between layers."""
        table = self._table
        assert table is not None
        strides = kv[0][0].stride()
        for i, (kb, vb) in enumerate(kv):
            if kb.stride() != strides or vb.stride() != strides:
                return None
            table[i * PTRS + _KV[0]] = kb.data_ptr()
            table[i * PTRS + _KV[1]] = vb.data_ptr()
        return strides

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
            width: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The next-token logits [n, V] of the embedded tokens h [n, d] (contiguous, updated in place); None when
        the caches' strides differ between layers (the caller's other path then runs)."""
        strides = self._bind(kv)
        if strides is None:
            return None
        assert self._table is not None
        n = h.shape[0]
        head = _w(self.lm_head)
        logits = torch.empty(n, head.shape[0], dtype=torch.float32)
        self.glue.decode_step(h, self._table, self._eps, self._scaling, len(self.layers), self.heads, self.kv_heads,
                              self.head_dim, self.inter, cos, sin, strides[0], strides[1], width, mask,
                              self.final_norm.weight, head, logits)
        return logits

    def run_greedy(self, embed: torch.Tensor, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv: list[tuple[torch.Tensor, torch.Tensor]], width: int, mask: torch.Tensor | None,
                   eos: torch.Tensor, eos_stops: torch.Tensor, budget_s: float, interrupt: ctypes.c_int) -> int | None:
        """Up to k greedy steps in one call (`CpuGlue.decode_run`): tokens int64 [k + 1, n], row 0 the pending
        tokens, the picks written below; embed [>= V, d] the embedding table. Returns the steps run, None when
        the caches' strides differ between layers."""
        strides = self._bind(kv)
        if strides is None:
            return None
        assert self._table is not None
        n = tokens.shape[1]
        head = _w(self.lm_head)
        h = torch.empty(n, self.hidden, dtype=torch.float32)
        logits = torch.empty(n, head.shape[0], dtype=torch.float32)
        return self.glue.decode_run(h, self._table, self._eps, self._scaling, len(self.layers), self.heads,
                                    self.kv_heads, self.head_dim, self.inter, cos, sin, strides[0], strides[1], width,
                                    mask, self.final_norm.weight, head, logits, embed, tokens, eos, eos_stops,
                                    budget_s, interrupt)


def plain_embedding(embed: torch.nn.Module, lm_head: torch.nn.Module) -> bool:
    """Whether a greedy run may look tokens up in this embedding itself: a plain float32 nn.Embedding (no hooks,
    no max_norm renormalising rows on lookup) with a row for every token the LM head can pick."""
    w = getattr(embed, "weight", None)
    return (type(embed) is torch.nn.Embedding and embed.max_norm is None and not embed._forward_hooks
            and not embed._forward_pre_hooks and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and w.is_contiguous() and w.shape[0] >= _w(lm_head).shape[0])


def rope_batchable(rotary: torch.nn.Module, top: int) -> bool:
    """Whether one call of the model's rotary module over a run's positions (the longest + 1 = `top`) gives each
    position what its own step's call would. The static RoPE types do; "dynamic" and "longrope" rescale by the
    longest position of the call (transformers' `dynamic_rope_update`), so only while it stays under the
    original context length, where both keep the original frequencies."""
    kind = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" not in kind and kind != "longrope":
        return True
    limits = [getattr(rotary, "original_max_seq_len", None)]
    params = getattr(getattr(rotary, "config", None), "rope_parameters", None)
    if isinstance(params, dict):
        limits.append(params.get("original_max_position_embeddings"))
    known = [int(x) for x in limits if isinstance(x, int)]
    return bool(known) and top < min(known)


def _layer_ptrs(layer: _Layer, hidden: int) -> tuple[list[int | None], int] | None:
    """One layer's row of the C table (K/V cache slots left for `run`) and its MLP width, or None when a
    projection's shape is not the Llama-style one the C step computes."""
    qd, kd = layer.q_width, layer.k_width
    if len(layer.qkv) == 1:
        w, b = _w(layer.qkv[0]), _b(layer.qkv[0])
        if tuple(w.shape) != (qd + 2 * kd, hidden):
            return None
        q, k, v = _ptr(w), _ptr(w, qd * hidden), _ptr(w, (qd + kd) * hidden)
        qb, kb, vb = (_ptr(b), _ptr(b, qd), _ptr(b, qd + kd)) if b is not None else (None, None, None)
    else:
        mq, mk, mv = layer.qkv
        if (tuple(_w(mq).shape), tuple(_w(mk).shape), tuple(_w(mv).shape)) != ((qd, hidden), (kd, hidden), (kd, hidden)):
            return None
        q, k, v = _ptr(_w(mq)), _ptr(_w(mk)), _ptr(_w(mv))
        qb, kb, vb = _ptr(_b(mq)), _ptr(_b(mk)), _ptr(_b(mv))
    if len(layer.gate_up) == 1:
        w, b = _w(layer.gate_up[0]), _b(layer.gate_up[0])
        inter = w.shape[0] // 2
        if tuple(w.shape) != (2 * inter, hidden):
            return None
        gate, up = _ptr(w), _ptr(w, inter * hidden)
        gb, ub = (_ptr(b), _ptr(b, inter)) if b is not None else (None, None)
    else:
        mg, mu = layer.gate_up
        inter = _w(mg).shape[0]
        if tuple(_w(mg).shape) != (inter, hidden) or tuple(_w(mu).shape) != (inter, hidden):
            return None
        gate, up, gb, ub = _ptr(_w(mg)), _ptr(_w(mu)), _ptr(_b(mg)), _ptr(_b(mu))
    if tuple(_w(layer.o).shape) != (hidden, qd) or tuple(_w(layer.down).shape) != (hidden, inter):
        return None
    row = [_ptr(layer.norm_in.weight), q, k, v, qb, kb, vb, _ptr(_w(layer.o)), _ptr(_b(layer.o)),
           _ptr(layer.norm_post.weight), gate, up, gb, ub, _ptr(_w(layer.down)), _ptr(_b(layer.down)), None, None]
    return row, int(inter)
