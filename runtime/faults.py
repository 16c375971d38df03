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

`ForwardGuard` applies this policy to the engine's forwards: the engine hands
it the rows and what to do with the rows that succeed. Under torchrun the same
policy holds on every rank: rank 0 broadcasts a plan
(`kaito.runtime.plan.StepPlan`) before each forward (`ForwardGuard.send`), the
retries and the probe included, and the plan that follows a failed forward says
so (`after_fault`), so worker ranks (`kaito.runtime.distributed.Replayer`) run
the same forwards in the same order, drop what their own copy of the failed
forward did, and go on.

`FaultHook` is the test-only injection point at this boundary: the guard
calls it with the rows of each forward just before running it. `env_fault`
builds one from KAITO_TEST_FAULT that every rank reads alike (torchrun tests).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from kaito.runtime.greedy_runs import StreamedRunFailed
from kaito.runtime.plan import StepPlan, prefill_plan
from kaito.runtime.sampling import sample
from kaito.runtime.scheduler import next_token
from kaito.runtime.sequence import EngineDead, Sequence

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


class ForwardGuard:
    """The engine's forwards with containment, kept here with the policy it applies.

    Owned by the engine (`kaito.runtime.engine`), which gives it the executor `ex`, `broadcast` (rank 0's plan
    broadcast, None in one process), `fail_rows(rows, outbox)` (end these rows with "error"), the lock that
    keeps adapter changes away from a forward on the prefill thread, and `hook` (tests). The engine passes
    each call the rows to run and `accept(rows, logits)`, which takes the rows of a forward that succeeded
    (alone or all together); rows that fail alone go to `fail_rows`. Every forward is preceded by its plan
    (`send`), so under torchrun the worker ranks run the same forwards, retries and probes included."""

    def __init__(self, ex, *, broadcast: Callable[[StepPlan], None] | None,
                 fail_rows: Callable[[list[Sequence], list | None], None], model_lock, hook: FaultHook | None = None,
                 probe_token: int = 0):
        self.ex, self.broadcast, self.fail_rows, self.model_lock = ex, broadcast, fail_rows, model_lock
        self.hook, self.probe_token = hook, probe_token
        self.faulted = False  # rank 0's last forward failed: the next plan tells the workers (`after_fault`)

    def send(self, plan: StepPlan) -> None:
        """Under torchrun: broadcast the plan of the next forward(s) (or a no-op) to the worker ranks."""
        if self.broadcast is None:
            return
        if self.faulted:
            plan, self.faulted = replace(plan, after_fault=True), False
        self.broadcast(plan)

    def run(self, kind: str, rows: list[Sequence], forward: Callable[[], Any]) -> Any:
        """One forward over `rows` (`kind`: prefill or decode), remembering a failure for the next plan."""
        try:
            if self.hook is not None:
                self.hook(kind, rows)
            return forward()
        except Exception:
            self.faulted = True
            raise

    def contain(self, e: BaseException, rows: list[Sequence], outbox: list | None = None) -> None:
        """A forward over only these rows failed: their requests fail, the engine goes on. EngineDead instead
        when the fault is the device's or the group's, or when a one-token probe forward (on every rank) fails too."""
        if is_device_fault(e):
            raise EngineDead(f"unrecoverable forward failure: {e!r}") from e
        log.error("a forward failed for %d request row(s) alone; failing only them: %r", len(rows), e)
        self.fail_rows(rows, outbox)

        def one_token():
            tokens = ((self.probe_token,),)
            self.send(StepPlan(keep=tuple(range(self.ex.batch_size)), probe=tokens))
            with self.model_lock:
                self.ex.prefill_forward([list(t) for t in tokens], [()])
        probe(one_token)

    def _contained(self, kind: str, rows: list[Sequence], forward: Callable[[list[Sequence]], Any],
                   accept: Callable[[list[Sequence], Any], None], outbox: list | None, alone=None) -> None:
        """forward(rows), then accept; when that forward fails, each row alone (`alone(row)`, default
        forward([row])), so only the rows that fail alone fail."""
        try:
            out = forward(rows)
        except Exception as e:
            if len(rows) == 1:
                return self.contain(e, rows, outbox)
            noun, gerund = {"prefill": ("prompts", "prefilling"), "decode": ("rows", "decoding")}[kind]
            log.warning("%s of %d %s failed (%r); %s each alone", kind, len(rows), noun, e, gerund)
            run_alone(rows, alone or (lambda s: forward([s])), lambda s, out: accept([s], out),
                      lambda e, r: self.contain(e, r, outbox))
            return
        accept(rows, out)

    def prefill(self, group: list[Sequence], accept: Callable[[list[Sequence], Any], None]) -> None:
        """The engine thread's prefill of `group` into the batch (one plan per forward)."""
        def forward(rows: list[Sequence]):
            plan = prefill_plan(self.ex.batch_size, [(s.prompt_ids, s.lora) for s in rows])
            self.send(plan)
            return self.run("prefill", rows, lambda: self.ex.prefill(plan.prompts, plan.loras))
        self._contained("prefill", group, forward, accept, None)

    def decode(self, plan: StepPlan, batch: list[Sequence], accept: Callable[[list[Sequence], Any], None]) -> None:
        """Rank 0's run of a decode plan: evict (`keep`), then decode the first len(decode) rows of `batch`,
        the engine's running rows after eviction. A retry row by row reorders `batch` in place, as it
        reorders the executor's rows."""
        self.send(plan)
        self.ex.evict(list(plan.keep))
        if not plan.decode:
            return
        rows = batch[:len(plan.decode)]
        tokens = list(plan.decode)
        self._contained("decode", rows, lambda r: self.run("decode", r, lambda: self.ex.decode(tokens)), accept, None,
                        alone=lambda s: self._decode_one(batch, s))

    def decode_run(self, plan: StepPlan, batch: list[Sequence], run: Callable[[list[int]], Any],
                   accept: Callable[[list[Sequence], Any], None]) -> int:
        """A greedy run (several decode steps in one call, `kaito.runtime.greedy_runs`) in place of `decode`: evict
        (`keep`), then run(tokens) over the first len(decode) rows and accept their picks. Returns the steps run;
        0 when it did not run (the executor could not, or the run raised, which changes nothing): the caller then
        decodes `plan.after_evict()` one step as usual, where a fault is contained row by row. A run that failed
        after some of its tokens were streamed (`StreamedRunFailed`) fails its rows instead (returns 1). One process only:
        no plan describes a run to torchrun workers (the engine offers none there)."""
        assert self.broadcast is None, "greedy runs are for one process: workers replay one-step plans"
        self.ex.evict(list(plan.keep))
        rows = batch[:len(plan.decode)]
        try:
            picks = self.run("decode", rows, lambda: run(list(plan.decode)))
        except StreamedRunFailed as e:  # some tokens are out: a step again would send them twice; these rows fail
            self.contain(e, rows)
            return 1
        except Exception as e:
            log.warning("a greedy run of %d rows failed (%r); decoding them one step at a time", len(rows), e)
            return 0
        if not picks:
            return 0
        accept(rows, picks)
        return len(picks)

    def _decode_one(self, batch: list[Sequence], s: Sequence):
        """Decode one running row alone: it moves to the batch's front (a permutation of the cache rows)
        and the executor decodes that prefix of one; the other rows get a padding column."""
        i = batch.index(s)
        order = [i] + [j for j in range(len(batch)) if j != i]
        plan = StepPlan(keep=tuple(order), decode=(next_token(s),))
        self.send(plan)
        self.ex.evict(order)
        batch[:] = [batch[j] for j in order]
        return self.run("decode", [s], lambda: self.ex.decode(list(plan.decode)))

    def prefill_apart(self, group: list[Sequence], accept: Callable[[list[Sequence], Any], None], outbox: list) -> None:
        """The prefill thread's forward of `group` (no batch state: `accept` gets (logits, kv, mask, pos))."""
        def forward(rows: list[Sequence]):
            def run():
                with self.model_lock:
                    return self.ex.prefill_forward([s.prompt_ids for s in rows], [s.lora for s in rows])
            return self.run("prefill", rows, run)
        self._contained("prefill", group, forward, accept, outbox)


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> tuple[list, list, list[int]]:
    """sample() for the batch; when that raises, each row alone. Returns (tokens, infos, failed row indices);
    a failed row's token is None."""
    try:
        batch_tokens, batch_infos = sample(logits, seqs, eos_ids)
        return batch_tokens, batch_infos, []
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
