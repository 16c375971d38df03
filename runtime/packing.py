"""CPU weight layouts for the decoder's linears: oneDNN's packed layout for batches, the dense weight for one or
two rows, and the switch between them.

Called by `kaito.runtime.fastpath.FastDecoder`: `pack_linears` when it is built on a CPU model, `LayoutSwitch.step`
before each decode step, `LayoutSwitch.idle` while the engine has nothing to run (through
`BatchExecutor.idle_layout`), and `packed_linear` (the op) from its `_lin`. The runtime only; nothing here is
imported by tuning or the operator.

Why two layouts (fp32, 88M bench model, 2 threads, all linears of one decode step, weights cycled as a step
reads them): one row 12.1-12.8 ms dense (MKL's GEMV, 27-29 GB/s, the bandwidth floor's own rate) against
14.1-15.2 ms packed; 8 rows 28-32 ms dense against 17-19 ms packed; 32 rows 34-39 against 28-32 ms. oneDNN
pays about 13 us per call and streams a little slower at one row, MKL repacks the whole weight on every
multi-row call. Served, one client: 17.4 ms per token dense against 20.3 ms packed; 8 clients 197 against
267 tok/s. In bf16 the packed layout wins at every row count (1 row 8.2 against 13.0 ms), so only float32
linears switch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch


def _no_packed_linear(*args: Any) -> torch.Tensor:
    raise RuntimeError("this torch build has no oneDNN (mkldnn): packed linears cannot run")


# The resolved overload: calling the op packet re-dispatches in Python on every call (85 calls per step).
packed_linear: Callable[..., torch.Tensor] = (
    torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else _no_packed_linear
)


# The input rows oneDNN picks the packed layout for. Measured (1 thread, fp32, 768x4096 weight, us per call,
# packed for 1 row / for 32 rows / dense): 1 row 492 / 507 / 459; 4 rows 779 / 494 / 904; 8 rows 962 / 642 /
# 1349; 32 rows 1784 / 1361 / 1705; 128 rows 4754 / 4271 / 4583. Any hint from 4 to 128 gives the same
# layout speed; a layout for one row makes batched decode and prefill as slow as the dense weight.
PACK_ROWS = 32


class PackedLinear(torch.nn.Linear):
    """A CPU Linear whose `weight` Parameter holds oneDNN's packed layout of the weight, and nothing else.

    Why: on CPU an unpacked multi-row `F.linear` repacks the whole weight on every call; the packed
    layout reads it once, streaming. Keeping it as the module's own weight (instead of a second copy
    beside it) keeps the model's memory at one copy. The packed tensor has the weight's shape, dtype and
    device but no readable storage, so: `state_dict()` gives the dense weight back, `load_state_dict()`
    packs what it loads, and moving or casting the module (`.to()`, `.half()`) first turns it back into a
    plain `torch.nn.Linear`, as are its deep copies and pickles. Forward hooks (LoRA) run as on any module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x if x.is_contiguous() else x.contiguous(), self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.detach().to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Parameter.copy_ cannot write into the packed layout: load into a dense weight, then pack that.
        self.weight = torch.nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight = torch.nn.Parameter(_packed(self.weight), requires_grad=False)

    def _apply(self, fn, recurse=True):
        unpack(self)
        return self._apply(fn, recurse)

    def __reduce_ex__(self, protocol):
        # Deep copies and pickles are plain Linears with the dense weight: the packed tensor has no storage
        # to copy or save, and a copy is usually made to be edited (merged weights) or moved.
        dense = torch.nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        state = {**self.__dict__, "_parameters": {**self._parameters, "weight": dense}}
        return object.__new__, (torch.nn.Linear,), state


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's layout of the weight for inputs of about PACK_ROWS rows."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def pack(m: torch.nn.Linear) -> PackedLinear:
    """Turn a plain Linear into a PackedLinear holding oneDNN's layout of its weight, in place."""
    w = torch.nn.Parameter(_packed(m.weight), requires_grad=False)
    m.__class__ = PackedLinear  # before the swap of weights: PackedLinear also runs a dense weight
    m.weight = w
    return m  # type: ignore[return-value]


def unpack(m: torch.nn.Linear) -> torch.nn.Linear:
    """Turn a PackedLinear back into a plain Linear with a dense weight, in place."""
    m.weight = torch.nn.Parameter(m.weight.detach().to_dense(), requires_grad=False)
    m.__class__ = torch.nn.Linear
    return m


def pack_linears(model: torch.nn.Module, modules: list[torch.nn.Module]) -> int:
    """Turn the plain CPU Linears among `modules` into PackedLinears, in place; returns how many are packed
    (those already packed by an earlier call included), 0 when packing does not apply.

    Measured on the 88M bench model (hidden 768 x 12, 1 thread): all linears of a batch-1 step 20.7 -> 15.3
    ms, of a 32-row step 84 -> 35 ms; bf16 5.9 ms at batch 1. Packing copies one weight at a time and frees
    the dense one, so it needs room for the largest weight only; it is skipped when that exceeds a quarter
    of the available memory. A weight shared with another module (an lm_head tied to the embeddings) stays
    dense: the embedding lookup needs it, and packing it would hold it twice. KAITO_PACKED_LINEARS=0 turns
    packing off. On a GPU nothing is packed (cuBLAS needs no reorder). `LayoutSwitch` may later turn
    float32 ones back to dense and pack them again."""
    if os.environ.get("KAITO_PACKED_LINEARS", "1") == "0" or not torch.backends.mkldnn.is_available():
        return 0
    lin = [m for m in modules if type(m) is torch.nn.Linear and _packable(m.weight)]
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    lin = [m for m in lin if uses.get(id(m.weight)) == 1]
    if lin and max(m.weight.numel() * m.weight.element_size() for m in lin) * 4 > _free_bytes():
        lin = []
    for m in lin:
        pack(m)
    if lin:
        _leave_checkpoint_file(model)
    return sum(1 for m in modules if type(m) is PackedLinear)


def _leave_checkpoint_file(model: torch.nn.Module) -> None:
    """Copy the model's remaining CPU tensors (embeddings, norms) into memory of their own.

    Why: transformers maps the safetensors file and its tensors are views of that mapping, which stays
    while any tensor views it; the pages the dense linear weights were read from then stay resident (in
    RSS and in the container's memory) beside their packed copies. Measured on the 88M bench model (fp32,
    RSS after one forward, then after packing): 693 -> 1028 MB with the file still mapped (as when the
    packed copies sat beside the dense weights), 693 -> 704 MB once it is unmapped. The copy is one tensor
    at a time (the largest: the embeddings) and `.data` is replaced in place, so tied weights stay tied."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.layout == torch.strided:
                t.data = t.data.clone()


def _packable(w: torch.Tensor) -> bool:
    if type(w) is not torch.nn.Parameter or w.device.type != "cpu" or w.layout != torch.strided:
        return False
    if w.dtype == torch.bfloat16:
        return _bf16_kernels()
    return w.dtype == torch.float32


def _free_bytes() -> int:
    """Memory available to new allocations: Linux's MemAvailable (free pages alone leave out the page
    cache, which on a host that has just read the checkpoint is most of the memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _bf16_kernels() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


# A decode step of at most this many rows runs faster on dense float32 weights (see the module docstring).
DENSE_ROWS = 2
# Consecutive steps of at most DENSE_ROWS rows before the linears go dense: one way through costs about 90 ms
# of repacking on the 88M model (2 threads) and saves about 3 ms per step, so a load that only briefly drops
# to one or two rows stays packed.
DENSE_AFTER = 64


class LayoutSwitch:
    """Moves a model's float32 PackedLinears between the packed layout and the dense weight, following the
    rows its decode steps have: dense after DENSE_AFTER steps of at most DENSE_ROWS rows, packed again from
    the first step with more. It converts one group (a decoder layer's linears) per step, so no step pays
    for the whole model (8-11 ms added to a step per layer on the 88M model, against ~90 ms for all of them) and memory
    never holds more than one extra weight. Either layout computes the same linear (to float rounding), so
    the order does not matter to the output: `_lin` runs whichever a module holds.

    KAITO_PACKED_LINEARS=1 keeps every linear packed (no switching), =0 never packs."""

    def __init__(self, groups: list[list[torch.nn.Module]]):
        self.groups = [g for g in ([m for m in grp if _switchable(m)] for grp in groups) if g]
        self.short = 0  # consecutive steps of at most dense_rows rows
        self.dense_rows = DENSE_ROWS  # raised by a decoder whose dense step is faster at more rows (the C step)
        self.dense = 0  # groups[:dense] hold dense weights, the rest packed
        self.enabled = bool(self.groups) and os.environ.get("KAITO_PACKED_LINEARS", "auto") == "auto"

    @property
    def target_dense(self) -> bool:
        return self.short >= DENSE_AFTER

    @property
    def idle_pending(self) -> bool:
        """Whether `idle` has groups left to turn dense."""
        return self.enabled and self.dense < len(self.groups)

    def idle(self) -> bool:
        """Called while the engine has nothing to run: one group toward dense, and the decode steps that follow
        go on that way unless they have more rows. Returns whether groups remain. Why: the next arrival after a
        quiet spell is most often alone, and it decoded packed (or paid a conversion per step) for its first
        DENSE_AFTER + len(groups) steps: a fresh server's first two 64-token requests on the 88M bench model
        averaged 32 and 24 ms a token against 20 once dense. A burst that arrives instead packs again one group
        per step, as any burst after single-row traffic does."""
        if not self.idle_pending:
            return False
        self.short = max(self.short, DENSE_AFTER - 1)
        self.step(0)
        return self.idle_pending

    def step(self, rows: int) -> None:
        """Called before a decode step of `rows` rows: converts at most one group toward the layout that wins."""
        if not self.enabled:
            return
        self.short = self.short + 1 if rows <= self.dense_rows else 0
        if self.dense == (len(self.groups) if self.target_dense else 0):
            return  # already in the layout that wins (most steps): nothing to enter or convert
        with torch.inference_mode(False), torch.no_grad():  # the new weights are ordinary tensors
            if self.target_dense:
                for m in self.groups[self.dense]:
                    if type(m) is PackedLinear:
                        unpack(m)
                self.dense += 1
            else:
                self.dense -= 1
                for m in self.groups[self.dense]:
                    if type(m) is torch.nn.Linear and _packable(m.weight):
                        pack(m)


def _switchable(m: torch.nn.Module) -> bool:
    return type(m) is PackedLinear and m.weight.dtype == torch.float32
