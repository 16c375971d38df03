"""GPU SKU tables, Kaito's fit rules and the `resource.count` rule.

Called by the CLI (`kaito presets fit`: Kaito's three GPU rules), the
operator's admission (`count_problem`: the node counts a preset can use on a
SKU), its settings and handlers (the `KAITO_MAX_REPLICAS` default) and its
rendering (`get_sku`: GPU requests per node). Tables live in
`sku_tables/*.yaml`, read through `kaito.presets.yamlio`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from kaito.presets.errors import InvalidInput
from kaito.presets.spec import PresetSpec
from kaito.presets.yamlio import read_mapping

TABLE_DIR = Path(__file__).parent / "sku_tables"


@dataclass(frozen=True)
class GPUSku:
    """One cloud instance type with GPUs."""

    name: str
    cloud: str
    gpus: int
    gpu_memory_gib: float  # total over all GPUs of the node
    gpu_model: str

    @property
    def per_gpu_memory_gib(self) -> float:
        return self.gpu_memory_gib / self.gpus


@functools.lru_cache(maxsize=1)
def sku_table() -> dict[str, GPUSku]:
    table: dict[str, GPUSku] = {}
    for path in sorted(TABLE_DIR.glob("*.yaml")):
        doc = read_mapping(path, "a mapping with keys cloud, skus", name=f"GPU SKU table {path}")
        for name, row in doc["skus"].items():
            table[name] = GPUSku(name=name, cloud=doc["cloud"], **row)
    return table


def get_sku(instance_type: str) -> GPUSku:
    table = sku_table()
    if instance_type in table:
        return table[instance_type]
    # Azure SKU names are case-insensitive in the API.
    for name, sku in table.items():
        if name.lower() == instance_type.lower():
            return sku
    raise InvalidInput(
        f"unknown instance type {instance_type!r}: supported GPU SKUs are {', '.join(sorted(table))}"
    )


@dataclass(frozen=True)
class FitResult:
    """Outcome of a fit check: ok, or the rule that failed with its numbers."""

    preset: str
    instance_type: str
    count: int
    ok: bool
    rule: Optional[str] = None
    message: str = ""
    alternatives: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


def _model_nodes(preset: PresetSpec, count: int) -> int:
    """Nodes one copy of the model spans: all of them when distributed, else one per replica."""
    return count if preset.supports_distributed_inference else 1


def _check(preset: PresetSpec, sku: GPUSku, count: int) -> Optional[tuple[str, str]]:
    need = preset.gpu
    count = _model_nodes(preset, count)
    have_gpus = count * sku.gpus
    if have_gpus < need.gpu_count:
        return (
            "gpu-count",
            f"GPU count: {count} x {sku.name} gives {have_gpus} GPU(s), {preset.name} needs {need.gpu_count}",
        )
    if sku.per_gpu_memory_gib < need.per_gpu_memory_gib:
        return (
            "per-gpu-memory",
            f"per-GPU memory: {sku.name} has {sku.per_gpu_memory_gib:g} GiB per GPU, "
            f"{preset.name} needs {need.per_gpu_memory_gib:g} GiB per GPU",
        )
    have_mem = count * sku.gpu_memory_gib
    if have_mem < need.total_gpu_memory_gib:
        return (
            "total-gpu-memory",
            f"total GPU memory: {count} x {sku.name} gives {have_mem:g} GiB, "
            f"{preset.name} needs {need.total_gpu_memory_gib:g} GiB",
        )
    return None


def fitting_skus(preset: PresetSpec, count: int = 1) -> list[GPUSku]:
    """SKUs that fit at this node count, smallest total GPU memory first."""
    fits = [s for s in sku_table().values() if _check(preset, s, count) is None]
    return sorted(fits, key=lambda s: (s.gpu_memory_gib, s.gpus, s.name))


def fit(preset: PresetSpec, instance_type: Union[str, GPUSku], count: int = 1) -> FitResult:
    """Apply Kaito's three rules: GPU count, per-GPU memory, total GPU memory.

    For a preset without distributed inference, `count` nodes are that many
    replicas, each holding the whole model: the rules apply to one node.
    """
    if count < 1:
        raise InvalidInput(f"count must be at least 1, got {count}")
    sku = instance_type if isinstance(instance_type, GPUSku) else get_sku(instance_type)
    failed = _check(preset, sku, count)
    if failed is None:
        return FitResult(preset.name, sku.name, count, True, message=f"{preset.name} fits {count} x {sku.name}")
    rule, detail = failed
    alts = tuple(s.name for s in fitting_skus(preset, count) if s.cloud == sku.cloud)[:5]
    hint = f"; SKUs that fit at count {count}: {', '.join(alts)}" if alts else ""
    return FitResult(preset.name, sku.name, count, False, rule, f"{detail}{hint}", alts)


def smallest_fit(preset: PresetSpec, cloud: Optional[str] = "azure") -> GPUSku:
    """The single-node SKU with the least GPU memory that fits the preset."""
    fits = [s for s in fitting_skus(preset, 1) if cloud is None or s.cloud == cloud]
    if not fits:
        raise InvalidInput(f"no single {cloud or ''} SKU fits {preset.name}; use several nodes (count > 1)")
    return fits[0]


# Replicas of a single-node preset one Workspace may ask for, unless the operator's
# KAITO_MAX_REPLICAS says otherwise: each replica is a GPU node (a NodeClaim).
DEFAULT_MAX_REPLICAS = 16


def nodes_needed(preset: PresetSpec, sku: GPUSku) -> int:
    """Nodes of `sku` one copy of the model needs, by total GPU memory and by GPU count."""
    need = preset.gpu
    by_memory = math.ceil(need.total_gpu_memory_gib / sku.gpu_memory_gib)
    by_gpus = math.ceil(need.gpu_count / sku.gpus)
    return max(1, by_memory, by_gpus)


@dataclass(frozen=True)
class CountRange:
    """The `resource.count` values a preset can use on a SKU, and why the bounds are what they are."""

    minimum: int
    maximum: int
    why: str

    def text(self) -> str:
        if self.minimum == self.maximum:
            return f"exactly {self.minimum}"
        return f"{self.minimum} to {self.maximum}"


def _needs(preset: PresetSpec, sku: GPUSku) -> str:
    need = preset.gpu
    return (
        f"{preset.name} needs {need.total_gpu_memory_gib:g} GiB of GPU memory on {need.gpu_count} GPU(s), "
        f"{sku.name} has {sku.gpu_memory_gib:g} GiB on {sku.gpus} GPU(s) per node"
    )


def count_range(preset: PresetSpec, sku: GPUSku, max_replicas: int = DEFAULT_MAX_REPLICAS) -> CountRange:
    """Node counts `preset` can use on `sku`; raise InvalidInput when no count can (the SKU is wrong).

    The one rule for the admission webhook, the reconcile handler and
    `kaito operator render`. A distributed preset runs one copy of the model
    split by pipeline stages over every node (a torchrun StatefulSet), so it
    needs exactly the nodes its memory and GPU count take on this SKU: fewer
    cannot hold it, and more would only add a network hop per stage to every
    token while their GPUs hold layers another node could have held (for more
    throughput, run more Workspaces). Any other preset runs whole on each node:
    `count` is its replica count, from 1 to the operator's `max_replicas`.
    """
    per_gpu = preset.gpu.per_gpu_memory_gib
    if sku.per_gpu_memory_gib < per_gpu:
        raise InvalidInput(
            f"{sku.name} has {sku.per_gpu_memory_gib:g} GiB per GPU, {preset.name} needs {per_gpu:g} GiB per GPU"
            f"{_alternatives(preset, sku)}"
        )
    needed = nodes_needed(preset, sku)
    if preset.supports_distributed_inference:
        return CountRange(
            needed,
            needed,
            f"{_needs(preset, sku)}, so one copy split by pipeline stages takes {needed} node(s); "
            "more nodes would only add network hops (run more Workspaces for more throughput)",
        )
    if needed > 1:
        raise InvalidInput(
            f"{_needs(preset, sku)}, and {preset.name} runs whole on each node (no distributed inference)"
            f"{_alternatives(preset, sku)}"
        )
    return CountRange(
        1,
        max_replicas,
        f"{preset.name} runs whole on each node, so count is its replica count, "
        f"at most the operator's KAITO_MAX_REPLICAS ({max_replicas})",
    )


def count_problem(
    preset: PresetSpec, sku: GPUSku, count: int, max_replicas: int = DEFAULT_MAX_REPLICAS
) -> Optional[str]:
    """Why `count` nodes of `sku` do not suit `preset` (None when they do); see `count_range`."""
    allowed = count_range(preset, sku, max_replicas)
    if allowed.minimum <= count <= allowed.maximum:
        return None
    side = "too few" if count < allowed.minimum else "too many"
    return (
        f"{count} is {side} for preset {preset.name} on {sku.name}: allowed {allowed.text()}; {allowed.why}"
    )


def _alternatives(preset: PresetSpec, sku: GPUSku) -> str:
    alts = [s.name for s in fitting_skus(preset, 1) if s.cloud == sku.cloud][:5]
    return f"; {sku.cloud} SKUs that hold it on one node: {', '.join(alts)}" if alts else ""
