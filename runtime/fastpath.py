"""A lean decode forward for Llama-style decoders (Phi-3, Llama, Mistral, Qwen2): one new token per row.

Called by `kaito.runtime.executor.BatchExecutor.decode` when `FastDecoder.build(model)` accepts the
model; otherwise the executor keeps transformers' own forward. Why: transformers' generic forward spends
about 2 ms of Python per call (mask building, output capturing, kwargs plumbing, module wrappers), which
on a small model or a fast GPU is most of a batched decode step. This path runs the same math with the
model's own weights, rotary module and transformers' SDPA attention function, writes K/V straight into
the executor's buffers, and calls a Linear module itself whenever it carries hooks (LoRA adapters,
quantization or offloading wrappers), so those still apply. On CPU its linears use oneDNN-packed copies
of the weights (`pack_linears`), the one change that moved a batch-1 step of the 88M bench model from 35
to ~18 ms and a 32-row step from ~100 to ~60 ms; LoRA hooks still run on their outputs.

On a GPU the same path runs unpacked (cuBLAS reads the weights as they are); what a GPU would add there,
unmeasured here: capturing this decode step in a CUDA graph per batch-size bucket (its per-op launch cost
is what this module's Python overhead is on CPU) and a paged KV layout instead of the padded window.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SUPPORTED = {"phi3", "llama", "mistral", "qwen2"}


# The resolved overload: calling the op packet re-dispatches in Python on every call (85 calls per step).
_PACKED_LINEAR = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None


def _lin(m: torch.nn.Module, x: torch.Tensor, packed: dict | None = None) -> torch.Tensor:
    w = packed.get(m) if packed else None
    if w is not None and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs:
        out = _PACKED_LINEAR(x if x.is_contiguous() else x.contiguous(), w, m.bias, "none", [], "")
        for hook in m._forward_hooks.values():  # LoRA adds its rows' deltas here, as in Module.__call__
            res = hook(m, (x,), out)
            out = out if res is None else res
        return out
    if type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks:
        return F.linear(x, m.weight, m.bias)
    return m(x)


def pack_linears(modules: list[torch.nn.Module]) -> dict:
    """oneDNN-packed copies of plain Linear weights on CPU ({} when it does not apply).

    Why: on CPU an unpacked fp32 `F.linear` lets oneDNN reorder the weight on every call; the packed
    layout reads it once, streaming. Measured on the 88M bench model (hidden 768 x 12, 1 thread): all
    linears of a batch-1 step 20.7 -> 15.3 ms, of a 32-row step 84 -> 35 ms; bf16 5.9 ms at batch 1.
    The copy costs the linears' bytes again, so it is skipped when they exceed a quarter of the free
    memory; KAITO_PACKED_LINEARS=0 turns it off. On a GPU nothing is packed (cuBLAS needs no reorder)."""
    lin = [m for m in modules if type(m) is torch.nn.Linear]
    if os.environ.get("KAITO_PACKED_LINEARS", "1") == "0" or not lin or not torch.backends.mkldnn.is_available():
        return {}
    w0 = lin[0].weight
    if w0.device.type != "cpu" or w0.dtype not in (torch.float32, torch.bfloat16):
        return {}
    if w0.dtype == torch.bfloat16 and not _bf16_kernels():
        return {}
    need = sum(m.weight.numel() * m.weight.element_size() for m in lin)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 0
    if need * 4 > free:
        return {}
    with torch.no_grad():
        return {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) for m in lin}


def _bf16_kernels() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
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


class FastDecoder:
    def __init__(self, model: torch.nn.Module):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        inner = model.model
        self.model, self.embed, self.norm, self.rotary, self.lm_head = model, inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.layers = list(inner.layers)
        self.attend = sdpa_attention_forward
        cfg = model.config
        self.silu = getattr(cfg, "hidden_act", None) == "silu"
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.packed = pack_linears([m for layer in self.layers for m in layer.modules()] + [self.lm_head])

    def _lin(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _lin(m, x, self.packed)

    @classmethod
    def build(cls, model: torch.nn.Module) -> FastDecoder | None:
        """The fast path for this model, or None when its forward differs from what this module mirrors."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED or model.training:
            return None
        if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(model, "hf_device_map", None):
            return None
        if getattr(model, "_tp_size", None) or any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return None  # tensor parallel: the HF forward owns the collectives
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
            return None
        for layer in inner.layers:
            at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if at is None or mlp is None or not hasattr(at, "o_proj") or not hasattr(mlp, "down_proj"):
                return None
            if not (hasattr(at, "qkv_proj") or all(hasattr(at, p) for p in ("q_proj", "k_proj", "v_proj"))):
                return None
            if not (hasattr(mlp, "gate_up_proj") or (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"))):
                return None
            if hasattr(at, "q_norm") or hasattr(at, "k_norm"):
                return None
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                    return None
        if not type(inner.norm).__name__.endswith("RMSNorm"):
            return None
        return cls(model)

    def usable(self, width: int) -> bool:
        """False once a sliding window could cut into the context (the HF forward masks that)."""
        return self.sliding_window is None or width + 1 < self.sliding_window

    def _qkv(self, at, x: torch.Tensor, n: int):
        if hasattr(at, "qkv_proj"):
            qkv = self._lin(at.qkv_proj, x)
            qd = at.config.num_attention_heads * at.head_dim
            kd = at.num_key_value_heads * at.head_dim if hasattr(at, "num_key_value_heads") else at.config.num_key_value_heads * at.head_dim
            q, k, v = qkv[..., :qd], qkv[..., qd:qd + kd], qkv[..., qd + kd:]
        else:
            q, k, v = self._lin(at.q_proj, x), self._lin(at.k_proj, x), self._lin(at.v_proj, x)
        shape = (n, x.shape[1], -1, at.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        if hasattr(mlp, "gate_up_proj"):
            gate, up = self._lin(mlp.gate_up_proj, x).chunk(2, dim=-1)
            act = F.silu(gate) if self.silu else mlp.activation_fn(gate)
            return self._lin(mlp.down_proj, up * act)
        gate = self._lin(mlp.gate_proj, x)
        act = F.silu(gate) if self.silu else mlp.act_fn(gate)
        return self._lin(mlp.down_proj, act * self._lin(mlp.up_proj, x))

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
            at = layer.self_attn
            x = _rms(layer.input_layernorm, h)
            q, k, v = self._qkv(at, x, n)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kv.append((k, v))
            o, _ = self.attend(at, q, k, v, mask, dropout=0.0, scaling=at.scaling, sliding_window=self.sliding_window,
                               is_causal=mask is None and L > 1)
            h = h + self._lin(at.o_proj, o.reshape(n, L, -1))
            h = h + self._mlp(layer.mlp, _rms(layer.post_attention_layernorm, h))
        return self._lin(self.lm_head, _rms(self.norm, h[:, -1:]))[:, -1, :], kv

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                kv: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
        """ids, position_ids: [n, 1]; mask: bool [n, 1, 1, width + 1] or None (attend to every column);
        kv: per layer [n, H, >width, D] buffer views whose first `width` columns hold the context — the new
        token's K/V are written at column `width`. Returns the next-token logits [n, V]."""
        n = ids.shape[0]
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (kb, vb) in zip(self.layers, kv):
            at = layer.self_attn
            x = _rms(layer.input_layernorm, h)
            q, k, v = self._qkv(at, x, n)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kb[:, :, width:width + 1] = k
            vb[:, :, width:width + 1] = v
            o, _ = self.attend(at, q, kb[:, :, :width + 1], vb[:, :, :width + 1], mask, dropout=0.0, scaling=at.scaling,
                               sliding_window=self.sliding_window)
            h = h + self._lin(at.o_proj, o.reshape(n, 1, -1))
            h = h + self._mlp(layer.mlp, _rms(layer.post_attention_layernorm, h))
        return self._lin(self.lm_head, _rms(self.norm, h))[:, -1, :]
