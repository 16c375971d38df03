"""Multi-LoRA with per-row strengths: the LoRA math applied by forward hooks.

Adapters are found and read by `kaito.runtime.serving` (`discover_adapters`
and `read_adapter` at start and for /v1/load_lora_adapter) and by the
non-zero torchrun ranks in `kaito.runtime.distributed`; the engine queues
them to the executor (`kaito.runtime.executor`), which owns the
`LoraManager`. Its `set_rows()` before each forward says which adapters, at
which strengths, each batch row uses; hooks on the targeted Linear modules then add
`strength * scaling * (x @ A^T) @ B^T` to those rows only. So one batch mixes
adapters, strengths and the bare base. Adapters are peft's on-disk format
(adapter_config.json + adapter_model.safetensors); we read the A/B matrices
ourselves (safetensors only, never pickle) instead of letting peft patch the
model, because peft can only run one adapter set per forward.

Several adapters on one row add their deltas (Kaito's "all adapters merged at
their strengths", i.e. peft's add_weighted_adapter with combination_type="cat").
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kaito.presets.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from kaito.presets.errors import InvalidInput
from safetensors.torch import load_file

# A row's adapter use: ((adapter name, strength), ...); () is the bare base model.
RowSpec = tuple[tuple[str, float], ...]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class LoraAdapter:
    name: str
    path: Path
    rank: int
    scaling: dict[str, float]  # module name -> alpha/r (or alpha/sqrt(r) with rsLoRA)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # module -> (A [r,in], B [out,r])


def _pattern_value(module: str, patterns: dict | None, default):
    # peft's matching rule for rank_pattern / alpha_pattern keys.
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_adapter(path: Path, name: str, model: torch.nn.Module) -> LoraAdapter:
    """Load and validate one peft LoRA directory against the model's modules."""
    path = Path(path)
    if not ADAPTER_NAME.match(name):
        raise InvalidInput(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    cfg = _read_config(path / ADAPTER_CONFIG_FILE, name)
    pairs = _lora_pairs(path / ADAPTER_WEIGHTS_FILE, name)
    modules = dict(model.named_modules())
    param = next(model.parameters())
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    weights, scaling = {}, {}
    for mod, ab in pairs.items():
        a, b = _fitting_pair(name, mod, ab, modules.get(mod))
        r = int(_pattern_value(mod, cfg.get("rank_pattern"), r_default))
        alpha = float(_pattern_value(mod, cfg.get("alpha_pattern"), alpha_default))
        scaling[mod] = alpha / (r**0.5 if rslora else r)
        weights[mod] = (a.to(param.device, param.dtype), b.to(param.device, param.dtype))
    return LoraAdapter(name=name, path=path, rank=r_default, scaling=scaling, weights=weights)


def _read_config(cfg_file: Path, name: str) -> dict:
    """adapter_config.json, refused unless it describes a plain LoRA this module applies."""
    if not cfg_file.is_file():
        raise InvalidInput(f"adapter {name}: {cfg_file} not found; an adapter directory needs peft's adapter_config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"adapter {name}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InvalidInput(f"adapter {name}: adapter_config.json must be a JSON object, not {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidInput(f"adapter {name}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters")
    if cfg.get("use_dora"):
        raise InvalidInput(f"adapter {name}: DoRA adapters (use_dora: true) are not supported; train a plain LoRA")
    if cfg.get("fan_in_fan_out"):
        raise InvalidInput(f"adapter {name}: fan_in_fan_out adapters (Conv1D models) are not supported")
    return cfg


def _lora_pairs(wfile: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The safetensors file's LoRA matrices by target module: {module: {"A": tensor, "B": tensor}}."""
    if not wfile.is_file():
        raise InvalidInput(f"adapter {name}: {wfile} not found; adapters must be saved as safetensors (no pickle files)")
    try:
        tensors = load_file(str(wfile))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise InvalidInput(f"adapter {name}: cannot read {wfile.name}: {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not m:
            if "lora_embedding" in key or key.endswith((".weight", ".bias")):
                raise InvalidInput(
                    f"adapter {name}: tensor {key!r} is not a LoRA A/B matrix (modules_to_save, biases and "
                    "embedding LoRA are not supported)"
                )
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise InvalidInput(f"adapter {name}: {wfile.name} holds no lora_A/lora_B tensors")
    return pairs


def _fitting_pair(name: str, mod: str, ab: dict[str, torch.Tensor], target: torch.nn.Module | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one module, checked against the model's Linear of that name."""
    if set(ab) != {"A", "B"}:
        raise InvalidInput(f"adapter {name}: module {mod} has lora_{'A' if 'A' in ab else 'B'} without its pair")
    if not isinstance(target, torch.nn.Linear):
        raise InvalidInput(f"adapter {name}: targets {mod!r}, which is not a Linear module of this model")
    a, b = ab["A"], ab["B"]
    if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
        raise InvalidInput(
            f"adapter {name}: {mod} A{tuple(a.shape)} B{tuple(b.shape)} does not fit Linear"
            f"({target.in_features}->{target.out_features}); was it trained on another model?"
        )
    return a, b


class LoraManager:
    """Holds loaded adapters and applies, per forward, each row's adapter mix."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.adapters: dict[str, LoraAdapter] = {}
        self._hooked: set[str] = set()
        self._modules = dict(model.named_modules())
        # Per thread (the engine's decode and prefill threads run forwards at once): adapter name ->
        # (row indices, per-row coefficient [n,1,1]); empty when no row uses adapters.
        self._local = threading.local()

    @property
    def _plan(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        return getattr(self._local, "plan", {})

    @_plan.setter
    def _plan(self, plan: dict) -> None:
        self._local.plan = plan

    def add(self, adapter: LoraAdapter) -> None:
        self.adapters[adapter.name] = adapter
        for mod in adapter.weights:
            if mod not in self._hooked:
                self._modules[mod].register_forward_hook(self._make_hook(mod))
                self._hooked.add(mod)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    @property
    def active(self) -> bool:
        """Whether some row of this thread's next forward uses an adapter (its hooks must run)."""
        return bool(self._plan)

    def set_rows(self, rows: list[RowSpec]) -> None:
        """Declare the adapter mix of each row of the next forward (batch order)."""
        plan: dict[str, list[tuple[int, float]]] = {}
        for i, spec in enumerate(rows):
            for name, strength in spec:
                if strength != 0.0 and name in self.adapters:
                    plan.setdefault(name, []).append((i, float(strength)))
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out: dict = {}
        for name, items in plan.items():
            idx = [i for i, _ in items]
            coef = torch.tensor([s for _, s in items], device=device, dtype=dtype).view(-1, 1, 1)
            # Every row on this adapter: skip the gather/scatter.
            rows_t = None if idx == list(range(len(rows))) else torch.tensor(idx, device=device)
            out[name] = (rows_t, coef)
        self._plan = out

    def _make_hook(self, mod: str):
        def hook(module, args, out):
            if not self._plan:
                return None
            x = args[0]
            squeeze = x.dim() == 2
            if squeeze:  # some models call Linear on [tokens, hidden]
                x, out = x.unsqueeze(0), out.unsqueeze(0)
            for name, (rows, coef) in self._plan.items():
                ad = self.adapters.get(name)
                if ad is None or mod not in ad.weights:
                    continue
                a, b = ad.weights[mod]
                c = coef * ad.scaling[mod]
                if rows is None:
                    out = out + ((x @ a.T) @ b.T) * c  # [B,T,out]
                else:
                    delta = ((x.index_select(0, rows) @ a.T) @ b.T) * c
                    out = out.index_add(0, rows, delta)
            return out.squeeze(0) if squeeze else out

        return hook


def discover_adapters(adapters_dir: Path) -> list[tuple[str, Path]]:
    """Kaito's rule: each sub-directory of the adapters dir holding adapter_config.json is one adapter."""
    d = Path(adapters_dir)
    if not d.is_dir():
        return []
    return sorted((p.name, p) for p in d.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG_FILE).is_file())
