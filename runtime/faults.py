"""Fault containment for the engine: a failing row fails its own request, a failing device ends the process.

Called by `kaito.runtime.engine` around every forward and every sampling call.
The policy (vLLM's engine dies on any exception and takes the server with it;
ours isolates first): when a forward over several rows raises, the engine
retries each row alone (`run_alone`), so only rows that fail alone fail; after
a row failed alone, `probe` runs a one-token forward that cannot be the
request's fault, and when that fails too the fault is the device's. A fault
that is the device's or the process group's (`is_device_fault`) raises
`EngineDead`: the engine stops and the server process exits non-zero so
Kubernetes restarts it. `sample_rows` gives sampling the same per-row isolation.

Under torchrun the same policy holds on every rank: rank 0 broadcasts a plan
before each forward (`_send`), the retries and the probe included, and the plan
that follows a failed forward says so (`after_fault`), so worker ranks
(`kaito.runtime.distributed.Replayer`) run the same forwards in the same order,
drop what their own copy of the failed forward did, and go on.

`FaultHook` is the test-only injection point at this boundary: the engine
calls it with the rows of each forward just before running it. `env_fault`
builds one from KAITO_TEST_FAULT that every rank reads alike (torchrun tests).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from kaito.runtime.sampling import sample
from kaito.runtime.sequence import EngineDead, Sequence, flush

log = logging.getLogger("kaito.runtime.faults")

# fn(kind, rows): kind is "prefill" or "decode"; raising makes that forward fail as a real fault would.
FaultHook = Callable[[str, list[Sequence]], None]

# Messages of faults that no retry of a smaller batch can fix: the accelerator or the process group is gone.
_DEVICE_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL", "device-side assert",
                   "illegal memory access", "Connection reset by peer", "Connection closed by peer", "Gloo")


# torch's own types for them, where this torch version has them.
_DEVICE_TYPES = tuple(t for t in (getattr(torch, "AcceleratorError", None), getattr(torch.distributed, "DistError", None))
                      if isinstance(t, type))


def is_device_fault(e: BaseException) -> bool:
    """Whether this exception means the device or the process group failed (not one request's data)."""
    if isinstance(e, (EngineDead, *_DEVICE_TYPES)):
        return True
    text = str(e)
    return any(m in text for m in _DEVICE_MARKERS)


def env_fault(tokenizer) -> Callable[[str, list[list[int]]], None] | None:
    """Tests only: KAITO_TEST_FAULT='{"prefill": TEXT, "decode": TEXT, "device": TEXT}' makes every forward of
    that kind over a row whose prompt is exactly TEXT raise, on every rank alike ("device": its prefill raises
    a CUDA error). Returns check(kind, prompt ids of the forward's rows)."""
    spec = os.environ.get("KAITO_TEST_FAULT")
    if not spec:
        return None
    bad = {kind: list(tokenizer(text)["input_ids"]) for kind, text in json.loads(spec).items()}

    def check(kind: str, prompts: list[list[int]]) -> None:
        for k in (kind, "device") if kind == "prefill" else (kind,):
            if k in bad and any(list(p) == bad[k] for p in prompts):
                raise RuntimeError(("CUDA error: " if k == "device" else "") + f"injected fault (KAITO_TEST_FAULT) in a {k} forward")
    return check


def env_fault_hook(tokenizer) -> FaultHook | None:
    """`env_fault` as the engine's FaultHook (rows are sequences)."""
    check = env_fault(tokenizer)
    return None if check is None else (lambda kind, rows: check(kind, [s.prompt_ids for s in rows]))


def probe(forward: Callable[[], Any]) -> None:
    """Run a known-good forward (one token, no batch state); EngineDead when even that fails."""
    try:
        forward()
    except Exception as e:
        raise EngineDead(f"a one-token probe forward failed after a request's forward did ({e!r}); "
                         "the device is not usable") from e


def run_alone(rows: Iterable[Sequence], forward: Callable[[Sequence], Any], accept: Callable[[Sequence, Any], None],
              contain: Callable[[BaseException, list[Sequence]], None]) -> None:
    """After a forward over several rows failed: run each still-unfinished row alone; `accept` the ones that
    succeed, `contain` the ones that fail (which raises EngineDead for a device fault)."""
    for s in list(rows):
        if s.finish_reason is not None:
            continue
        try:
            out = forward(s)
        except Exception as e:
            contain(e, [s])
            continue
        accept(s, out)


class ContainedForwards:
    """The engine's forwards with containment (a mixin of `kaito.runtime.engine.Engine`, kept here with the
    policy it applies). Uses the engine's executor `ex`, `running`, `broadcast`, `eos_ids`, `fault_hook`,
    `step_failures`, `metrics`, `_cv`, `_ready`, `_inflight`, `_model_lock`, `_advance` and `_finish`."""

    _faulted = False  # rank 0's last forward failed: the next plan tells the workers (`after_fault`)

    def _send(self, plan: dict) -> None:
        """Under torchrun: broadcast the plan of the next forward(s) (or a no-op) to the worker ranks."""
        if self.broadcast is None:
            return
        if self._faulted:
            plan, self._faulted = {**plan, "after_fault": True}, False
        self.broadcast(plan)

    def _prefill_plan(self, rows: list[Sequence]) -> dict:
        return {"keep": list(range(len(self.running))), "decode": [],
                "prefill": [(s.prompt_ids, [list(x) for x in s.lora]) for s in rows]}

    def _guarded(self, kind: str, rows: list[Sequence], forward: Callable[[], Any]) -> Any:
        try:
            if self.fault_hook is not None:
                self.fault_hook(kind, rows)
            return forward()
        except Exception:
            self._faulted = True
            raise

    def _contain(self, e: BaseException, rows: list[Sequence], outbox: list | None = None) -> None:
        """A forward over only these rows failed: their requests fail, the engine goes on. EngineDead instead
        when the fault is the device's or the group's, or when a one-token probe forward (on every rank) fails too."""
        if is_device_fault(e):
            raise EngineDead(f"unrecoverable forward failure: {e!r}") from e
        log.error("a forward failed for %d request row(s) alone; failing only them: %r", len(rows), e)
        self.step_failures += 1
        for s in rows:
            if s.finish_reason is None:
                self._finish(s, "error", outbox)

        def one_token():
            tokens = [[self.eos_ids[0] if self.eos_ids else 0]]
            self._send({"keep": list(range(self.ex.batch_size)), "decode": [], "prefill": [], "probe": tokens})
            with self._model_lock:
                self.ex.prefill_forward(tokens, [()])
        probe(one_token)

    def _prefill_alone(self, group: list[Sequence], e: BaseException) -> None:
        """The inline path's prefill of `group` failed: each row alone joins the batch or fails by itself."""
        if len(group) == 1:
            return self._contain(e, group)
        log.warning("prefill of %d prompts failed (%r); prefilling each alone", len(group), e)

        def forward(s: Sequence):
            self._send(self._prefill_plan([s]))
            return self._guarded("prefill", [s], lambda: self.ex.prefill([s.prompt_ids], [s.lora]))

        def accept(s: Sequence, logits) -> None:
            self.running.append(s)
            self._advance([s], logits)
        run_alone(group, forward, accept, self._contain)

    def _decode_step(self, rows: list[Sequence], tokens: list[int]) -> None:
        """Decode the running rows by one token; when the batch's forward fails, each row alone."""
        try:
            logits = self._guarded("decode", rows, lambda: self.ex.decode(tokens))
        except Exception as e:
            if len(rows) == 1:
                return self._contain(e, rows)
            log.warning("decode of %d rows failed (%r); decoding each alone", len(rows), e)
            run_alone(rows, self._decode_one, lambda s, logits: self._advance([s], logits), self._contain)
            return
        self._advance(rows, logits)

    def _decode_one(self, s: Sequence):
        """Decode one running row alone: it moves to the batch's front (a permutation of the cache rows)
        and the executor decodes that prefix of one; the other rows get a padding column."""
        i = self.running.index(s)
        order = [i] + [j for j in range(len(self.running)) if j != i]
        self._send({"keep": order, "decode": [s.pending], "prefill": []})
        self.ex.evict(order)
        self.running = [self.running[j] for j in order]
        return self._guarded("decode", [s], lambda: self.ex.decode([s.pending]))

    def _prefill_group(self, group: list[Sequence], outbox: list) -> None:
        """The prefill thread's forward of one group, its first tokens, and the hand-over to the engine thread;
        when the group's forward fails, each prompt alone."""
        def forward(rows: list[Sequence]):
            def run():
                with self._model_lock:
                    return self.ex.prefill_forward([s.prompt_ids for s in rows], [s.lora for s in rows])
            return self._guarded("prefill", rows, run)

        def accept(rows: list[Sequence], out) -> None:
            logits, kv, mask, pos = out
            if self.metrics is not None:
                self.metrics.record_prefill(rows)
            self._advance(rows, logits, outbox)
            flush(outbox)
            with self._cv:  # one lock: the rows never count twice (in-flight and ready) for the gauges
                self._ready.append((rows, kv, mask, pos))
                self._inflight = [s for s in self._inflight if s not in rows]
                self._cv.notify_all()

        def contain(e: BaseException, rows: list[Sequence]) -> None:
            self._contain(e, rows, outbox)

        try:
            out = forward(group)
        except Exception as e:
            if len(group) == 1:
                return contain(e, group)
            log.warning("prefill of %d prompts failed (%r); prefilling each alone", len(group), e)
            run_alone(group, lambda s: forward([s]), lambda s, o: accept([s], o), contain)
            return
        accept(group, out)


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> tuple[list, list, list[int]]:
    """sample() for the batch; when that raises, each row alone. Returns (tokens, infos, failed row indices);
    a failed row's token is None."""
    try:
        tokens, infos = sample(logits, seqs, eos_ids)
        return tokens, infos, []
    except Exception:
        log.exception("sampling a batch of %d rows failed; sampling each row alone", len(seqs))
    tokens: list = [None] * len(seqs)
    infos: list = [None] * len(seqs)
    failed = []
    for i, s in enumerate(seqs):
        try:
            t, info = sample(logits[i:i + 1], [s], eos_ids)
            tokens[i], infos[i] = t[0], info[0]
        except Exception:
            log.exception("sampling failed for request row %d alone; failing it", s.id)
            failed.append(i)
    return tokens, infos, failed
