"""Greedy runs: when the engine decodes several steps in one C call, and the bookkeeping around one.

Called by the engine (`kaito.runtime.engine`) on its thread once per step: `steps()` says how many steps the next
decode may take as one run (0: one step as usual), `forward()` is the run the fault guard calls
(`kaito.runtime.faults.ForwardGuard.decode_run`, which runs the executor's `greedy_run`), `accept()` hands the
tokens the streamer did not send to the output processor step by step. Whatever changes what the engine should
do next (an arrival, a cancellation, an adapter change, a prefilled group, stop) calls `interrupt()` from its
own thread: the C loop reads that flag between steps and ends the run there.

While a run goes on, `RunStreamer` (its own thread) sends the steps the C loop has finished every `every_s`
(`RuntimeSettings.decode_run_ms`): a token waits at most that long for its client, however long the run.

Why: a batch-1 step of the 3.7M bench model took ~0.35 ms in C and as long again in the executor's Python around
it, and the engine's step (scheduler, sampling, output) and the event loop's chunk per token came on top: served,
1.32 ms a token against a 0.33 ms bandwidth floor. In a run each step is C only (0.31-0.33 ms a step in-process),
and the Python is paid once per run. Runs used to end when their tokens were due (50 ms: two steps of the 88M
bench model, whose ~2.5 ms of Python per run then cost ~1.3 ms a token); streaming them from the running loop
lets a run go on to `MAX_STEPS` without holding its tokens back.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kaito.runtime.plan import StepPlan
from kaito.runtime.sampling import plain_greedy
from kaito.runtime.sequence import Sequence, flush

log = logging.getLogger(__name__)

MAX_STEPS = 64  # steps of one run at most
# The longest one run may take (unless its tokens may wait longer): an arrival or a cancellation ends it anyway;
# this only bounds how long the engine thread stays in C on a model whose steps take a second.
RUN_CAP_S = 2.0


class StreamedRunFailed(RuntimeError):
    """A run failed after the streamer had sent some of its tokens: its rows cannot decode that step again."""


class RunStreamer:
    """Sends a run's finished steps while the C loop goes on (`begin` before the call, `end` after it).

    The run's picks tensor starts at -1 below its first row; the C loop writes a step's picks (>= 0) before it
    starts the next step, so a row with no -1 left is final. Its own daemon thread, started at the first run and
    ended after a quiet minute; deliveries hold its lock, so `end` returns only once none is under way."""

    IDLE_EXIT_S = 60.0

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._cv = threading.Condition()
        self._live: tuple[torch.Tensor, Callable[[list[list[int]]], None]] | None = None
        self._sent = 0
        self._due = 0.0
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None  # a delivery of the current run raised (it stopped streaming)

    def begin(self, picks: torch.Tensor, deliver: Callable[[list[list[int]]], None]) -> None:
        """A run over `picks` [k + 1, n] starts: from every_s from now, deliver(steps) gets its finished steps."""
        with self._cv:
            self._live, self._sent, self._due = (picks, deliver), 0, time.monotonic() + self.every_s
            self.error = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kaito-run-streamer", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def end(self) -> int:
        """The run returned (or raised): no more deliveries; returns how many of its steps were sent."""
        with self._cv:
            self._live = None
            return self._sent

    def _loop(self) -> None:
        with self._cv:
            while True:
                if self._live is None:
                    if not self._cv.wait(self.IDLE_EXIT_S) and self._live is None:
                        self._thread = None  # begin() starts another
                        return
                    continue
                wait = self._due - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                picks, deliver = self._live
                ready = finished_steps(picks, self._sent)
                if ready:
                    try:
                        deliver(picks[self._sent + 1:self._sent + ready + 1].tolist())
                    except Exception as e:  # its rows may hold part of these steps: the run's caller fails them
                        log.exception("streaming a greedy run's tokens failed")
                        self.error, self._live = e, None
                        continue
                    self._sent += ready
                self._due = time.monotonic() + self.every_s


def finished_steps(picks: torch.Tensor, sent: int) -> int:
    """How many steps after the first `sent` the C loop has finished: rows of picks[1:] with no -1 left."""
    done = (picks[sent + 1:] >= 0).all(1)
    return int(done.numel() if bool(done.all()) else int(torch.argmin(done.to(torch.uint8))))


class GreedyRuns:
    """The engine's runs: how often their tokens go out (`budget_s`, 0 = no runs), the context limit, the
    interrupt flag and the streamer."""

    def __init__(self, budget_s: float, max_model_len: int):
        self.budget_s, self.max_model_len = budget_s, max_model_len
        self.flag = ctypes.c_int(0)
        self.streamer = RunStreamer(budget_s)
        self.streamed = 0  # steps of the last run the streamer sent

    def interrupt(self) -> None:
        """End the run under way after its current step (any thread; a plain int store the C loop polls)."""
        self.flag.value = 1

    def steps(self, plan: StepPlan, rows: list[Sequence], eos_ids: list[int], idle: bool, one_process: bool) -> int:
        """How many steps the decode of `plan` over `rows` (the batch after its evictions) may take as one run;
        0: one step as usual. Only in one process (no plan could tell torchrun workers), when nothing waits to be
        admitted, merged or applied (`idle`), every row plain greedy without an adapter; at most the fewest tokens
        any row may still take, so no row decodes past its limit. Called with the engine's lock held, so an
        arrival after this call interrupts the run."""
        self.flag.value = 0  # before looking: whatever changes from now on ends the run
        if not self.budget_s or not one_process or not idle or not plan.decode or len(plan.decode) != len(plan.keep):
            return 0
        k = MAX_STEPS
        for s in rows[:len(plan.decode)]:
            if s.finish_reason is not None or s.cancelled or s.lora or not plain_greedy(s.params, len(s.output_ids), eos_ids):
                return 0
            k = min(k, s.params.max_tokens - len(s.output_ids), self.max_model_len - len(s.prompt_ids) - len(s.output_ids))
        return k if k >= 2 else 0

    def forward(self, ex: Any, rows: list[Sequence], k: int, eos_ids: list[int], output: Any) -> Callable[[list[int]], Any]:
        """The run of up to k steps from the rows' pending tokens, on the executor (`BatchExecutor.greedy_run`),
        its finished steps streamed to the output processor while it goes on (`streamed` says how many)."""
        stops = [not s.params.ignore_eos for s in rows]

        def deliver(steps: list[list[int]]) -> None:  # on the streamer's thread; the engine's waits in C
            outbox: list = []
            self.accept(output, rows, steps, outbox, skip=0)
            flush(outbox)
            if any(s.finish_reason is not None or s.cancelled for s in rows):
                self.interrupt()  # a stop string or a cancellation: the run's other steps would be discarded

        def run(tokens: list[int]) -> Any:
            self.streamed, self.streamer.error = 0, None
            try:
                picks = ex.greedy_run(tokens, k, eos_ids, stops[:len(tokens)], max(self.budget_s, RUN_CAP_S),
                                      self.flag, watch=lambda picks: self.streamer.begin(picks, deliver))
            except Exception as e:
                if self.streamer.end():
                    raise StreamedRunFailed(f"a greedy run failed after streaming some of its tokens: {e!r}") from e
                raise
            finally:
                self.streamed = self.streamer.end()
            if self.streamer.error is not None:
                raise StreamedRunFailed(f"streaming a greedy run's tokens failed: {self.streamer.error!r}")
            return picks
        return run

    def accept(self, output: Any, rows: list[Sequence], picks: list[list[int]], outbox: list,
               skip: int | None = None) -> None:
        """A run's tokens, step by step, through the output processor, past the first `skip` (default: the
        steps the streamer sent): a row that ended on one (EOS, a stop string, its length) skips the rest, as
        it would have stopped there."""
        for tokens in picks[self.streamed if skip is None else skip:]:
            output.append(rows, tokens, [None] * len(rows), outbox)
