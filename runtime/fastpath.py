"""A lean decode forward for Llama-style decoders (Phi-3, Llama, Mistral, Qwen2): one new token per row.

Called by `kaito.runtime.executor.BatchExecutor.decode` when `FastDecoder.build(model)` accepts the
model; otherwise the executor keeps transformers' own forward. Why: transformers' generic forward spends
about 2 ms of Python per call (mask building, output capturing, kwargs plumbing, module wrappers), which
on a small model or a fast GPU is most of a batched decode step. This path runs the same math with the
model's own weights, rotary module and transformers' SDPA attention function, writes K/V straight into
the executor's buffers, and calls a Linear module itself whenever it carries hooks (LoRA adapters,
quantization or offloading wrappers), so those still apply.

On CPU the decoder's Linear modules become `PackedLinear`s (`pack_linears`): their weight is replaced, in
place, by oneDNN's packed layout of it, so the model holds one copy of each weight and transformers' own
forward, LoRA hooks and `state_dict()` keep working on the same modules. That moved a batch-1 step of the
88M bench model from 35 to ~18 ms and a 32-row step from ~100 to ~60 ms (one thread). Packing changes the
model itself, once, when the first FastDecoder is built on it: later executors on that model find it packed.
One or two rows (up to eight with the C step below) decode faster on the dense float32 weight (MKL's GEMV),
so `kaito.runtime.packing.LayoutSwitch` turns the linears back to dense, a layer per step, once a server has
decoded that few rows for a while or sat idle (`LayoutSwitch.idle`, from the engine), and packs them again when
a step has more.

On a float32 CPU model a decode step without adapter rows runs `_glue_decode`: the same math with the ops
between the linears done by the C glue (`kaito.runtime.cglue`: one call per RMSNorm, one for RoPE + KV write +
attention on torch's OpenMP team, one for SiLU * up) and each residual added by the linear's own GEMV
(`addmm_`). Those ~60 small ops a layer cost several times their own time right after a linear has streamed
its weight through the caches; the glue took the 88M bench model's batch-1 step from 17.7 to 15.4 ms and its
32-row step from 71.7 to 60.4, the 3.7M model's from 1.04 to 0.65 and 5.9 to 4.0 (see GLUE_ATTEND_BYTES).
Once every linear is dense and hook-free (the layout switch turns them dense after a run of steps of up to
`cstep.DENSE_ROWS` rows), the whole step is one C call instead (`kaito.runtime.cstep`): the 88M model's batch-1 step
went from 14.1 to 12.3 ms against 11.6 ms for its GEMVs alone, the 3.7M model's from 0.54 to 0.39.

With `compile_decode` the decode step (`_plain_forward`: the same math, linears called without hooks) goes
through torch.compile (inductor, dynamic shapes) and the weights stay dense instead of packed: the RMSNorm,
RoPE, residual and SiLU ops fuse into a few C++ kernels and a step's Python shrinks to inductor's wrapper,
which also leaves the HTTP server more of the GIL. A step where some row uses an adapter runs the eager
forward (LoRA's hooks). The executor (`BatchExecutor.warmup`) compiles the three graphs (one row; rows with
and without padding) before serving.

On a GPU the same path runs unpacked (cuBLAS reads the weights as they are); what a GPU would add there,
unmeasured here: capturing this decode step in a CUDA graph per batch-size bucket (its per-op launch cost
is what this module's Python overhead is on CPU) and a paged KV layout instead of the padded window.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from kaito.runtime import cglue, cstep
from kaito.runtime.packing import LayoutSwitch, PackedLinear, pack_linears, packed_linear

SUPPORTED = {"phi3", "llama", "mistral", "qwen2"}
# The glue's attention splits (row, kv head) items over torch's OpenMP team when it is built with OpenMP
# (`CpuGlue.threaded`), and then serves every step. Measured (2 threads, ms per step, torch ops -> glue, same
# process): 88M bench model 1 row 17.7 -> 15.4, 4 rows 25.6 -> 23.0, 8 rows 31.9 -> 28.4, 32 rows 71.7 -> 60.4;
# 3.7M model 1 row 1.04 -> 0.65, 8 rows 2.37 -> 1.63, 32 rows 5.9 -> 4.0; against the glue with torch's SDPA
# for attention, the threaded one was 0.7-0.8 ms a step faster at one row (160 to 1,600 columns) and 9 ms at
# 32 rows. Built without OpenMP it reads the cache on one thread, from memory the linears have just flushed,
# and beat SDPA only where a layer's K/V are small (3.7M model, one row, ~290 KB: 0.65 against 0.70 ms a step;
# the 88M model at 160-330 columns, 1-2 MB a layer, lost 0.6-1.7 ms): that build attends itself only there.
GLUE_ATTEND_BYTES = 384 << 10  # without OpenMP: a single row's layer K/V up to this size attends in the glue
GLUE_SILU_ROWS = 4  # the glue's SiLU (scalar expf) up to this many rows; torch's vectorized one beyond
log = logging.getLogger("kaito.runtime.fastpath")


def _lin(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is PackedLinear and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs:
        out = packed_linear(x if x.is_contiguous() else x.contiguous(), m.weight, m.bias, "none", [], "")
        for hook in m._forward_hooks.values():  # LoRA adds its rows' deltas here, as in Module.__call__
            res = hook(m, (x,), out)
            out = out if res is None else res
        return out
    if type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks:
        return F.linear(x, m.weight, m.bias)
    return m(x)


def _plain(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear of the compiled decode step: the dense weight, no hooks (`_compilable` checked them)."""
    return F.linear(x, m.weight, m.bias)  # type: ignore[arg-type]


def _compilable(linears: list[torch.nn.Module]) -> bool:
    """Whether the compiled decode step may run these linears as plain `F.linear`: dense torch Linears (not
    packed by an earlier executor, not quantized) with no hooks yet (LoRA's come later and send a step with
    adapter rows to the eager forward)."""
    lin = [m for m in linears if isinstance(m, torch.nn.Linear)]
    return bool(lin) and all(type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                             for m in lin)



class _Norm(Protocol):
    """What `_rms` reads of these models' RMSNorm modules."""

    weight: torch.Tensor
    variance_epsilon: float


def _rms(norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    # The RMSNorm of these models, op for op (float32 statistics, weight applied in the input dtype).
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]  # partial rotary (Phi-3 small variants)
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _attr(owner: object, name: str) -> Any:
    """An attribute `FastDecoder.build` checked for; transformers declares these per model class."""
    value = getattr(owner, name, None)
    if value is None:
        raise TypeError(f"fast decode: {type(owner).__name__} has no {name}")
    return value


def _module(owner: object, name: str) -> torch.nn.Module:
    m = _attr(owner, name)
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"fast decode: {type(owner).__name__}.{name} is not a module")
    return m


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the forward reads it, resolved once at build: the names differ by architecture
    (fused qkv_proj/gate_up_proj in Phi-3, separate projections in Llama), and a Module attribute lookup per
    step costs Python time."""

    attn: torch.nn.Module  # handed to transformers' attention function
    qkv: tuple[torch.nn.Module, ...]  # (qkv_proj,) fused, or (q_proj, k_proj, v_proj)
    q_width: int  # where k and v start in a fused qkv output
    k_width: int
    o: torch.nn.Module
    head_dim: int
    scaling: float
    gate_up: tuple[torch.nn.Module, ...]  # (gate_up_proj,) fused, or (gate_proj, up_proj)
    down: torch.nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    norm_in: _Norm
    norm_post: _Norm

    @classmethod
    def of(cls, layer: torch.nn.Module, silu: bool) -> _Layer:
        at, mlp = _module(layer, "self_attn"), _module(layer, "mlp")
        head_dim, cfg = int(_attr(at, "head_dim")), _attr(at, "config")
        kv_heads = getattr(at, "num_key_value_heads", None) or cfg.num_key_value_heads
        fused_qkv, fused_mlp = hasattr(at, "qkv_proj"), hasattr(mlp, "gate_up_proj")
        return cls(
            attn=at,
            qkv=tuple(_module(at, p) for p in (("qkv_proj",) if fused_qkv else ("q_proj", "k_proj", "v_proj"))),
            q_width=cfg.num_attention_heads * head_dim,
            k_width=kv_heads * head_dim,
            o=_module(at, "o_proj"),
            head_dim=head_dim,
            scaling=float(_attr(at, "scaling")),
            gate_up=tuple(_module(mlp, p) for p in (("gate_up_proj",) if fused_mlp else ("gate_proj", "up_proj"))),
            down=_module(mlp, "down_proj"),
            act=F.silu if silu else _attr(mlp, "activation_fn" if fused_mlp else "act_fn"),
            norm_in=_attr(layer, "input_layernorm"),
            norm_post=_attr(layer, "post_attention_layernorm"),
        )

    def qkv_heads(self, x: torch.Tensor, lin: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [n, heads, T, head_dim] of x [n, T, hidden]; `lin` calls each projection."""
        if len(self.qkv) == 1:
            qkv = lin(self.qkv[0], x)
            qd, kd = self.q_width, self.k_width
            q, k, v = qkv[..., :qd], qkv[..., qd:qd + kd], qkv[..., qd + kd:]
        else:
            q, k, v = (lin(m, x) for m in self.qkv)
        shape = (x.shape[0], x.shape[1], -1, self.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def mlp(self, x: torch.Tensor, lin: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if len(self.gate_up) == 1:
            gate, up = lin(self.gate_up[0], x).chunk(2, dim=-1)
            return lin(self.down, up * self.act(gate))
        gate = lin(self.gate_up[0], x)
        return lin(self.down, self.act(gate) * lin(self.gate_up[1], x))


class FastDecoder:
    """The prefill and decode forwards of one supported model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, compile_decode: bool = False):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        inner, cfg = _module(model, "model"), _attr(model, "config")
        self.model = model
        self.embed, self.rotary = _module(inner, "embed_tokens"), _module(inner, "rotary_emb")
        self.norm: _Norm = _attr(inner, "norm")
        self.lm_head = _module(model, "lm_head")
        silu = getattr(cfg, "hidden_act", None) == "silu"
        self.layers = [_Layer.of(layer, silu) for layer in _module(inner, "layers").children()]
        self.attend = sdpa_attention_forward
        self.sliding_window: int | None = getattr(cfg, "sliding_window", None)
        linears = [m for layer in _module(inner, "layers").children() for m in layer.modules()] + [self.lm_head]
        # The compiled step reads dense weights: inductor takes oneDNN's packed layout only as a frozen constant
        # (`torch._inductor.config.freezing`), and frozen packed weights measured no faster in the server than
        # the eager step (88M bench model: 33.5 ms per token at 1 client, 350 tok/s at 32), where the dense
        # compiled step was 28 ms and, on the 3.7M model, 1.5 ms and 5,056 tok/s (eager 2.4 ms, 3,642 tok/s).
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.packed = 0
        self.layout = LayoutSwitch([])
        if compile_decode and _compilable(linears):
            self.compiled = torch.compile(self._plain_forward, dynamic=True)
        else:
            if compile_decode:
                log.warning("compile_decode: the model's linears are packed, quantized or carry hooks; "
                            "decoding eagerly")
            self.packed = pack_linears(model, linears)
            groups = [[*layer.modules()] for layer in _module(inner, "layers").children()]
            self.layout = LayoutSwitch(groups[:-1] + [groups[-1] + [self.lm_head]] if groups else [])
        self.glue = self._glue(model, cfg, silu)
        # The whole step in one C call once every linear is dense (up to cstep.DENSE_ROWS rows a step): see
        # kaito.runtime.cstep. KAITO_CPU_STEP=0 keeps the glue path (A/B).
        on = os.environ.get("KAITO_CPU_STEP", "1") != "0"
        self.step = cstep.DecodeStep(self.glue, self.layers, self.norm, self.lm_head) if on and self.glue else None
        if self.step is not None and self._step_threads():
            self.layout.dense_rows = cstep.DENSE_ROWS
        self._wt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(Linear) -> (weight, weight.t())

    def _glue(self, model: torch.nn.Module, cfg: Any, silu: bool) -> cglue.CpuGlue | None:
        """The C glue when this model's decode step fits it: float32 on CPU, SiLU MLPs, heads of at most
        MAX_HEAD_DIM, not compiled (the compiled step fuses the same ops its own way)."""
        p = next(model.parameters(), None)
        if self.compiled is not None or p is None or p.device.type != "cpu" or p.dtype != torch.float32 or not silu:
            return None
        if not self.layers or any(layer.head_dim > cglue.MAX_HEAD_DIM for layer in self.layers):
            return None
        kv_heads = {layer.k_width // layer.head_dim for layer in self.layers}
        heads = {layer.q_width // layer.head_dim for layer in self.layers}
        if len(kv_heads) != 1 or len(heads) != 1 or next(iter(heads)) % next(iter(kv_heads)):
            return None
        return cglue.load()

    @classmethod
    def build(cls, model: torch.nn.Module, compile_decode: bool = False) -> FastDecoder | None:
        """The fast path for this model, or None when its forward differs from what this module mirrors."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED or model.training:
            return None
        if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(model, "hf_device_map", None):
            return None
        if getattr(model, "_tp_size", None) or any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return None  # tensor parallel: the HF forward owns the collectives
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        if not hasattr(model, "lm_head") or not type(inner.norm).__name__.endswith("RMSNorm"):
            return None
        if not all(_mirrored(layer) for layer in inner.layers):
            return None
        return cls(model, compile_decode)

    def usable(self, width: int) -> bool:
        """False once a sliding window could cut into the context (the HF forward masks that)."""
        return self.sliding_window is None or width + 1 < self.sliding_window

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, position_ids: torch.Tensor, pad: torch.Tensor
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Whole left-padded prompts: ids, position_ids, pad (1 = real token) [n, L]. Returns the last
        position's logits [n, V] and each layer's rotated K/V [n, H, L, D] for the executor's buffers.

        Why: a burst of arrivals is prefilled in several forwards, and transformers' per-call Python (and
        each op's wait for the GIL the event loop holds) was most of a short prompt's time to first token."""
        n, L = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        real = pad.bool()
        mask = None
        if L > 1 and not bool(real.all()):
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
            # Padding queries keep their own column: a fully masked row would be NaN, and their K/V land
            # (masked) in the cache, where a non-finite value poisons attention even at weight 0.
            mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=ids.device)
        kv = []
        for layer in self.layers:
            q, k, v = layer.qkv_heads(_rms(layer.norm_in, h), _lin)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kv.append((k, v))
            o, _ = self.attend(layer.attn, q, k, v, mask, dropout=0.0, scaling=layer.scaling,
                               sliding_window=self.sliding_window, is_causal=mask is None and L > 1)
            h = h + _lin(layer.o, o.reshape(n, L, -1))
            h = h + layer.mlp(_rms(layer.norm_post, h), _lin)
        return _lin(self.lm_head, _rms(self.norm, h[:, -1:]))[:, -1, :], kv

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                kv: list[tuple[torch.Tensor, torch.Tensor]], width: int, adapters: bool = False) -> torch.Tensor:
        """ids, position_ids: [n, 1]; mask: bool [n, 1, 1, width + 1] or None (attend to every column);
        kv: per layer [n, H, >width, D] buffer views whose first `width` columns hold the context — the new
        token's K/V are written at column `width`. Returns the next-token logits [n, V]. `adapters`: some
        row of this step uses a LoRA adapter, whose hooks only the eager forward runs."""
        self.layout.step(ids.shape[0])
        if self.compiled is not None and not adapters:
            with torch.no_grad():  # dynamo traces under no_grad; the buffers stay inference tensors
                return self.compiled(ids, position_ids, mask, kv, width)
        if self.glue is not None and not adapters and _glue_kv(kv):
            return self._glue_decode(self.glue, ids, position_ids, mask, kv, width)
        return self._decode(ids, position_ids, mask, kv, width, _lin)

    def runnable(self, n: int, width: int) -> bool:
        """Whether `greedy_run` could run n rows up to `width` columns now (cheap: asked before every decode of
        few enough rows while the engine offers runs)."""
        return (self.step is not None and self.compiled is None and n <= cstep.MAX_ROWS and self._step_threads()
                and self.usable(width) and self.step.ready() and cstep.plain_embedding(self.embed, self.lm_head))

    def greedy_run(self, tokens: list[int], positions: torch.Tensor, mask: torch.Tensor | None,
                   kv: list[tuple[torch.Tensor, torch.Tensor]], width: int, k: int, eos: torch.Tensor,
                   eos_stops: torch.Tensor, budget_s: float, interrupt: Any,
                   watch: Any = None) -> list[list[int]] | None:
        """Up to k greedy decode steps in one C call (`cstep.DecodeStep.run_greedy`), or None when this model's
        step cannot run them now (not all dense, hooks, a rotary that rescales, a sliding window in reach): the
        caller then decodes one step as usual. tokens: the rows' pending tokens; positions [n]: theirs;
        mask: bool [n, >= width + k] or None; kv: views with room for k new columns. Returns each step's
        picks ([steps][n]); the K/V of every step's input are written. watch(picks) sees the int64 [k + 1, n] tensor
        the C loop fills (-1 below row 0 until a step writes its row) just before the call."""
        step, n = self.step, len(tokens)
        if step is None or not self.runnable(n, width + k - 1):
            return None
        pos = positions.view(n, 1) + torch.arange(k, device=positions.device)
        if not cstep.rope_batchable(self.rotary, int(pos.max()) + 1):
            return None
        self.layout.step(n)
        if not step.ready():  # the layout started packing
            return None
        table = self.embed.weight
        assert isinstance(table, torch.Tensor)  # runnable() checked: a plain nn.Embedding
        cos, sin = self.rotary(table[:1], position_ids=pos)  # [n, k, drot]
        cos, sin = cos.transpose(0, 1).contiguous(), sin.transpose(0, 1).contiguous()
        picks = torch.full((k + 1, n), -1, dtype=torch.long)
        picks[0] = torch.tensor(tokens, dtype=torch.long)
        if watch is not None:
            watch(picks)
        done = step.run_greedy(table, picks, cos, sin, kv, width, mask, eos, eos_stops, budget_s,
                               interrupt)
        return None if done is None else picks[1:done + 1].tolist()

    def _t(self, m: torch.nn.Linear) -> torch.Tensor:
        """The transposed view of a dense Linear's weight, made again when the layout switch swapped it."""
        w, wt = self._wt.get(id(m), (None, None))
        if w is not m.weight or wt is None:
            w, wt = m.weight, m.weight.t()
            self._wt[id(m)] = (w, wt)
        return wt

    def _step_threads(self) -> bool:
        """Whether the C step runs on as many threads as MKL would (its projections replace MKL's GEMVs)."""
        return self.glue is not None and (self.glue.threaded or torch.get_num_threads() == 1)

    def _mm(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A linear of [n, in] rows: MKL straight on a plain dense Linear, else `_lin` (packed, hooked)."""
        if type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks:
            wt = self._t(m)
            return torch.mm(x, wt) if m.bias is None else torch.addmm(m.bias, x, wt)
        return _lin(m, x.unsqueeze(1)).squeeze(1)

    def _mm_add(self, m: torch.nn.Module, x: torch.Tensor, h: torch.Tensor) -> None:
        """h += linear(x), in place: one addmm on a plain dense Linear (the residual add rides the GEMV)."""
        if type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks:
            h.addmm_(x, self._t(m))
            if m.bias is not None:
                h.add_(m.bias)
        else:
            h.add_(_lin(m, x.unsqueeze(1)).squeeze(1))

    def _glue_decode(self, glue: cglue.CpuGlue, ids: torch.Tensor, position_ids: torch.Tensor,
                     mask: torch.Tensor | None, kv: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
        """`_decode`'s math with the glue between the linears (float32 CPU, no adapter row): one C call for
        each RMSNorm, one for RoPE + KV write + attention, one for SiLU * up; residuals added by the GEMV."""
        n = ids.shape[0]
        h = self.embed(ids).view(n, -1)  # a fresh tensor: the residual stream is updated in place
        cos, sin = self.rotary(h, position_ids=position_ids)
        cos, sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
        m = None if mask is None else mask.reshape(n, -1).contiguous()
        step = self.step
        if step is not None and n <= cstep.MAX_ROWS and self._step_threads() and step.ready():
            logits = step.run(h, cos, sin, kv, width, m)
            if logits is not None:
                return logits
        first = self.layers[0]
        heads, kv_heads = first.q_width // first.head_dim, first.k_width // first.head_dim
        x = torch.empty_like(h)
        for layer, (kb, vb) in zip(self.layers, kv):
            o = torch.empty(n, first.q_width, dtype=h.dtype)
            glue.rmsnorm(h, layer.norm_in.weight, layer.norm_in.variance_epsilon, x)
            if len(layer.qkv) == 1:
                qkv = self._mm(layer.qkv[0], x)
                qd, kd = layer.q_width, layer.k_width
                q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
            else:
                q, k, v = (self._mm(p, x) for p in layer.qkv)
            if glue.threaded or (n == 1 and 8 * kv_heads * layer.head_dim * (width + 1) <= GLUE_ATTEND_BYTES):
                glue.attention(q, k, v, cos, sin, kb, vb, width, m, heads, kv_heads, layer.head_dim, layer.scaling, o)
            else:
                qr = glue.rope_kv(q, k, v, cos, sin, kb, vb, width, heads, kv_heads, layer.head_dim, o)
                a = F.scaled_dot_product_attention(qr.view(n, heads, 1, -1), kb[:, :, :width + 1],
                                                   vb[:, :, :width + 1], attn_mask=mask, scale=layer.scaling,
                                                   enable_gqa=heads != kv_heads)
                o = a.reshape(n, -1)
            self._mm_add(layer.o, o, h)
            glue.rmsnorm(h, layer.norm_post.weight, layer.norm_post.variance_epsilon, x)
            if len(layer.gate_up) == 1:
                gu = self._mm(layer.gate_up[0], x)
                half = gu.shape[1] // 2
                gate, up = gu[:, :half], gu[:, half:]
            else:
                gate, up = (self._mm(p, x) for p in layer.gate_up)
            if n <= GLUE_SILU_ROWS:
                act = glue.silu_mul(gate, up, torch.empty(n, gate.shape[1], dtype=h.dtype))
            else:
                act = up * F.silu(gate)
            self._mm_add(layer.down, act, h)
        return self._mm(self.lm_head, glue.rmsnorm(h, self.norm.weight, self.norm.variance_epsilon, x))

    def _plain_forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                       kv: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
        """The decode step torch.compile traces: linears without hooks (no adapter row in the step)."""
        return self._decode(ids, position_ids, mask, kv, width, _plain)

    def _decode(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                kv: list[tuple[torch.Tensor, torch.Tensor]], width: int,
                lin: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        n = ids.shape[0]
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (kb, vb) in zip(self.layers, kv):
            q, k, v = layer.qkv_heads(_rms(layer.norm_in, h), lin)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kb[:, :, width:width + 1] = k
            vb[:, :, width:width + 1] = v
            o, _ = self.attend(layer.attn, q, kb[:, :, :width + 1], vb[:, :, :width + 1], mask, dropout=0.0,
                               scaling=layer.scaling, sliding_window=self.sliding_window)
            h = h + lin(layer.o, o.reshape(n, 1, -1))
            h = h + layer.mlp(_rms(layer.norm_post, h), lin)
        return lin(self.lm_head, _rms(self.norm, h))[:, -1, :]


def _glue_kv(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the cache views have the layout the C attention walks: float32, unit stride over head_dim,
    head_dim between columns (the executor's buffers always do; checked on the first layer)."""
    k, v = kv[0]
    d = k.shape[-1]
    return (k.dtype == torch.float32 and k.stride(3) == 1 and k.stride(2) == d and v.stride() == k.stride()
            and k.device.type == "cpu")


def _mirrored(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer has the parts, and only the parts, that `_Layer` reads."""
    at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if at is None or mlp is None or not hasattr(at, "o_proj") or not hasattr(mlp, "down_proj"):
        return False
    if not (hasattr(at, "qkv_proj") or all(hasattr(at, p) for p in ("q_proj", "k_proj", "v_proj"))):
        return False
    if not (hasattr(mlp, "gate_up_proj") or (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"))):
        return False
    if hasattr(at, "q_norm") or hasattr(at, "k_norm"):
        return False
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return all(type(nm).__name__.endswith("RMSNorm") and hasattr(nm, "variance_epsilon") for nm in norms)
