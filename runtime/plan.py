"""The plan of one engine forward: a frozen, versioned dataclass, and its JSON wire format.

Made by the scheduler (`kaito.runtime.scheduler`) and the fault containment (`kaito.runtime.faults`, for
its row-by-row retries and probes) on rank 0; executed there by the engine (`kaito.runtime.engine`) and,
under torchrun, broadcast as JSON bytes by `kaito.runtime.distributed.send_plan` and replayed by every
worker rank (`distributed.Replayer`), so every rank runs the same forwards in the same order. One plan per
forward: rows kept (evictions), then a probe, a prefill or a decode; adapter changes, an idle no-op and the
final stop travel the same way.

The wire format is this dataclass (`to_json`/`from_json`; no pickle). `version` changes whenever a field's
meaning changes: a worker that receives a plan of another version stops with a message naming both, as it
runs another kaito build than rank 0 and replaying would silently diverge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Literal

from kaito.presets.errors import KaitoError

PLAN_VERSION = 1

# A row's adapters, as `kaito.runtime.lora.RowSpec`: ((adapter name, strength), ...); () is the bare base.
Lora = tuple[tuple[str, float], ...]


class PlanVersionError(KaitoError):
    """A plan from a rank 0 that speaks another plan version (another kaito build): the ranks cannot replay it."""


@dataclass(frozen=True)
class PrefillRow:
    prompt: tuple[int, ...]
    lora: Lora = ()


@dataclass(frozen=True)
class AdapterOp:
    """Install (`load`, read from `path` on every rank) or drop (`unload`) an adapter between forwards."""

    kind: Literal["load", "unload"]
    name: str
    path: str = ""


@dataclass(frozen=True)
class StepPlan:
    """What every rank does next, in this order: adapter `ops`, keep rows `keep` (row j becomes old row
    keep[j]; rows not listed are evicted), a one-token `probe` forward, prefill `prefill` (their rows join
    the batch), decode the first len(`decode`) rows by these tokens. `after_fault`: rank 0's previous forward
    failed (workers take back what their own copy did). `noop`: nothing (keeps idle workers' collective
    under its timeout). `stop`: shut down, non-zero when `error` is set."""

    keep: tuple[int, ...] = ()
    decode: tuple[int, ...] = ()
    prefill: tuple[PrefillRow, ...] = ()
    ops: tuple[AdapterOp, ...] = ()
    probe: tuple[tuple[int, ...], ...] = ()
    after_fault: bool = False
    noop: bool = False
    stop: bool = False
    error: str | None = None
    version: int = PLAN_VERSION

    @property
    def prompts(self) -> list[list[int]]:
        return [list(r.prompt) for r in self.prefill]

    @property
    def loras(self) -> list[Lora]:
        return [r.lora for r in self.prefill]

    def after_evict(self) -> StepPlan:
        """This plan once its evictions are done: the same forward over the rows as they now stand."""
        return replace(self, keep=tuple(range(len(self.keep))))

    def to_json(self) -> bytes:
        # vars(), not dataclasses.asdict: asdict deep-copies every token id (milliseconds for a long prompt).
        wire = {**vars(self), "prefill": [vars(r) for r in self.prefill], "ops": [vars(o) for o in self.ops]}
        return json.dumps(wire, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StepPlan:
        """Decode a plan; PlanVersionError when it was written by another plan version."""
        raw = json.loads(data)
        version = raw.get("version") if isinstance(raw, dict) else None
        if version != PLAN_VERSION:
            raise PlanVersionError(f"received an engine plan of version {version!r}, this rank replays version "
                                   f"{PLAN_VERSION}: every rank must run the same kaito image")
        return cls(
            keep=tuple(raw["keep"]), decode=tuple(raw["decode"]),
            prefill=tuple(PrefillRow(tuple(r["prompt"]), _lora(r["lora"])) for r in raw["prefill"]),
            ops=tuple(AdapterOp(o["kind"], o["name"], o["path"]) for o in raw["ops"]),
            probe=tuple(tuple(p) for p in raw["probe"]), after_fault=bool(raw["after_fault"]),
            noop=bool(raw["noop"]), stop=bool(raw["stop"]), error=raw["error"])


def _lora(spec) -> Lora:
    return tuple((str(name), float(strength)) for name, strength in spec)


def prefill_plan(batch_rows: int, rows: list[tuple[list[int], Lora]]) -> StepPlan:
    """Prefill these (prompt, lora) rows after the `batch_rows` rows of the batch (which all stay)."""
    return StepPlan(keep=tuple(range(batch_rows)), prefill=tuple(PrefillRow(tuple(p), tuple(lo)) for p, lo in rows))


NOOP = StepPlan(noop=True)
