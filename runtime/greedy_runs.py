"""Greedy runs: when the engine decodes several steps in one C call, and the bookkeeping around one.

Called by the engine (`kaito.runtime.engine`) on its thread once per step: `steps()` says how many steps the next
decode may take as one run (0: one step as usual), `forward()` is the run the fault guard calls
(`kaito.runtime.faults.ForwardGuard.decode_run`, which runs the executor's `greedy_run`), `accept()` hands its
tokens to the output processor step by step. Whatever changes what the engine should do next (an arrival, a
cancellation, an adapter change, a prefilled group, stop) calls `interrupt()` from its own thread: the C loop
reads that flag between steps and ends the run there.

Why: a batch-1 step of the 3.7M bench model took ~0.35 ms in C and as long again in the executor's Python around
it, and the engine's step (scheduler, sampling, output) and the event loop's chunk per token came on top: served,
1.32 ms a token against a 0.33 ms bandwidth floor. In a run each step is C only (0.31-0.33 ms a step in-process),
and the Python is paid once per run. The cost is delivery: a run's tokens reach the clients together, at most
the budget (`RuntimeSettings.decode_run_ms`) after its first.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from kaito.runtime.plan import StepPlan
from kaito.runtime.sampling import plain_greedy
from kaito.runtime.sequence import Sequence

MAX_STEPS = 64  # steps of one run at most


class GreedyRuns:
    """The engine's runs: their time budget (`budget_s`, 0 = never), the context limit and the interrupt flag."""

    def __init__(self, budget_s: float, max_model_len: int):
        self.budget_s, self.max_model_len = budget_s, max_model_len
        self.flag = ctypes.c_int(0)

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

    def forward(self, ex: Any, rows: list[Sequence], k: int, eos_ids: list[int]) -> Callable[[list[int]], Any]:
        """The run of up to k steps from the rows' pending tokens, on the executor (`BatchExecutor.greedy_run`)."""
        stops = [not s.params.ignore_eos for s in rows]
        return lambda tokens: ex.greedy_run(tokens, k, eos_ids, stops[:len(tokens)], self.budget_s, self.flag)

    @staticmethod
    def accept(output: Any, rows: list[Sequence], picks: list[list[int]], outbox: list) -> None:
        """A run's tokens, step by step, through the output processor: a row that ended on one (EOS, a stop
        string, its length) skips the rest, as it would have stopped there."""
        for tokens in picks:
            output.append(rows, tokens, [None] * len(rows), outbox)
