"""The engine loop: continuous batching glued from a scheduler, the executor and an output processor.

Called by the serving layer (`kaito.runtime.serving`) with plain data: `submit()` queues sequences
(QueueFull beyond `max_waiting`: 429), `cancel()` frees a sequence's slot (client disconnects),
`add_adapter()`/`remove_adapter()` change adapters between forwards and raise when the change did not happen,
and each sequence's `events` queue receives `Token`s and one `Finished` (`kaito.runtime.sequence`).

Each step of the engine thread asks the scheduler (`kaito.runtime.scheduler`) what to evict and decode, runs
that plan (`kaito.runtime.plan.StepPlan`) on the executor through the fault guard
(`kaito.runtime.faults.ForwardGuard`: a forward over several rows that fails is retried row by row, only a
device or torchrun group fault stops the engine and calls `on_fatal`), and hands the sampled tokens to the
output processor (`kaito.runtime.output`). By default every forward runs on the engine thread, with all
the torch threads: a step admits arrivals after its decode and prefills them, one chunk
(`prefill_chunk_tokens`) whatever the time and more for up to `prefill_step_ratio` times the decode's time.
With the optional prefill thread (`prefill_thread`; never under torchrun, where every rank replays rank 0's
plans one forward at a time, nor for rotary embeddings that rescale by length), arrivals are prefilled on it
while the batch decodes, all that wait sharing one forward, and the engine thread merges their rows between
two decode steps. On CPU that means two forward threads sharing the cores; one thread with every core
measured faster (see `RuntimeSettings.prefill_thread`). Forwards never run on the event loop.

Greedy runs (`kaito.runtime.greedy_runs`; `decode_run_s`, the server's `decode_run_ms`): when every running row
is plain greedy and nothing waits, one executor call decodes several steps in C and the step's Python is paid
once per run; the run's finished steps are streamed while it goes on (`greedy_runs.RunStreamer`, every
`decode_run_s`), and an arrival, cancellation or adapter change ends it at its next token (`runs.interrupt()`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kaito.runtime.executor import BatchExecutor
from kaito.runtime.faults import ForwardGuard, env_fault_hook, is_device_fault, sample_rows
from kaito.runtime.greedy_runs import GreedyRuns
from kaito.runtime.lora import LoraAdapter
from kaito.runtime.output import OutputProcessor
from kaito.runtime.plan import NOOP, AdapterOp, StepPlan
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.scheduler import Scheduler
from kaito.runtime.sequence import EngineDead, Finished, NeverFits, QueueFull, Sequence, Token, flush

log = logging.getLogger("kaito.runtime.engine")

# Quiet this long before an idle engine turns a layer of its weights dense (and between layers): a gap between
# one client's requests is shorter, so steady traffic never sees a conversion it did not ask for.
IDLE_LAYOUT_S = 0.05
OP_TIMEOUT_S = 60.0  # an adapter change the engine thread has not taken by then is withdrawn and reported


@dataclass(eq=False)
class _AdapterRequest:
    """An adapter change waiting for the engine thread; `error` is what its caller raises."""
    op: AdapterOp
    adapter: LoraAdapter | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Prefilled(NamedTuple):
    """Rows the prefill thread prefilled, waiting for the engine thread to merge them into the batch."""
    rows: list[Sequence]
    kv: Any
    mask: Any
    pos: Any


class _Delegate:
    """An engine attribute that is a component's (`engine.tok` is `engine.output.tok`)."""
    def __init__(self, component: str, name: str):
        self.component, self.name = component, name

    def __get__(self, engine, owner=None):
        return self if engine is None else getattr(getattr(engine, self.component), self.name)

    def __set__(self, engine, value) -> None:
        setattr(getattr(engine, self.component), self.name, value)


class Engine:
    """The loop and its queues; `scheduler`, `output` and `guard` are its parts (see the module docstring)."""

    def __init__(self, executor: BatchExecutor, tokenizer, *, eos_ids: list[int], max_model_len: int,
                 max_batch_size: int = 32, max_waiting: int = 256, metrics=None,
                 broadcast: Callable[[StepPlan], None] | None = None, max_prefill_tokens: int = 4096,
                 prefill_chunk_tokens: int = 512, prefill_step_ratio: float = 4.0, prefill_thread: bool = False,
                 decode_run_s: float = 0.0):
        self.ex = executor
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.broadcast = broadcast
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_waiting=max_waiting,
                                   max_prefill_tokens=max_prefill_tokens, prefill_chunk_tokens=prefill_chunk_tokens,
                                   prefill_step_ratio=prefill_step_ratio)
        self.output = OutputProcessor(tokenizer, eos_ids=eos_ids, max_model_len=max_model_len, metrics=metrics)
        self._model_lock = threading.Lock()  # adapter (un)loading vs a prefill forward on the other thread
        self.guard = ForwardGuard(executor, broadcast=broadcast, fail_rows=self._fail_rows, model_lock=self._model_lock,
                                  hook=env_fault_hook(tokenizer), probe_token=eos_ids[0] if eos_ids else 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ops: deque[_AdapterRequest] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_failures = 0
        self._admitting: list[Sequence] = []  # taken from `waiting`, not yet in `running` (failure cleanup)
        self._outbox: list = []  # events of the engine thread's current step, flushed at its end
        self.error: BaseException | None = None
        # The prefill thread (`_prefill_loop`): sequences it is prefilling, and prefilled rows to merge.
        self.prefill_thread = prefill_thread and broadcast is None
        if self.prefill_thread:
            executor.freeze_layout()  # a layout switch mid-step would race with the prefill thread's forward
        self._prefiller: threading.Thread | None = None
        self._inflight: list[Sequence] = []
        self._ready: list[_Prefilled] = []
        self._merging = 0  # rows taken from `_ready` and not yet in `running` (counted as busy meanwhile)
        self.on_fatal: Callable[[BaseException], None] | None = None  # the server: exit the process
        self.runs = GreedyRuns(decode_run_s, max_model_len)

    # The tokenizer, the EOS rule and the fault hook (tests) live in the components that use them.
    tok = _Delegate("output", "tok")
    eos_ids = _Delegate("output", "eos_ids")
    fault_hook = _Delegate("guard", "hook")

    # ---- called from the event loop -------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences of one request together; all or none (QueueFull when waiting would help,
        NeverFits when it would not)."""
        if any(not s.prompt_ids for s in seqs):
            raise NeverFits("the prompt is empty (0 tokens); send at least one token of text")
        self.check_fits(len(seqs))
        with self._cv:
            if self.error is not None:  # nobody would ever run them
                raise EngineDead(f"the engine stopped after {self.error!r}")
            # Rows that finished in the last step still sit in `running` until the next evicts them.
            busy = sum(1 for s in self.running if s.finish_reason is None) + self._pending_rows()
            if not self.scheduler.accepts(len(self.waiting), len(seqs), busy):
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.scheduler.max_waiting})")
            self.waiting.extend(seqs)
            self.runs.interrupt()
            self._cv.notify_all()
        self._gauges()

    def check_fits(self, rows: int) -> None:
        """NeverFits when one request's `rows` sequences could never be held at once, however long they waited
        (the serving layer checks a multi-prompt request as a whole with this before submitting any prompt)."""
        self.scheduler.check_fits(rows)

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cv:
            for s in seqs:
                if s.finish_reason is None:
                    s.cancelled = True
            self.runs.interrupt()
            self._cv.notify_all()

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Install an adapter between forwards (workers re-read it from the same path); raises when it was not."""
        self._run_op(_AdapterRequest(AdapterOp("load", adapter.name, str(adapter.path)), adapter))

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter between forwards; raises when it was not dropped."""
        self._run_op(_AdapterRequest(AdapterOp("unload", name)))

    def _run_op(self, req: _AdapterRequest) -> None:
        """Run an adapter change on the engine thread (or here before it started) and raise its failure: the
        caller records the change only when this returns."""
        what = f"adapter {req.op.kind} of {req.op.name}"
        with self._cv:
            if self.error is not None or self._stop:
                raise EngineDead(f"{what}: the engine is stopped" + (f" after {self.error!r}" if self.error else ""))
            threaded = self._thread is not None and self._thread.is_alive()
            if threaded:
                self._ops.append(req)
                self.runs.interrupt()
                self._cv.notify_all()
        if not threaded:
            self._apply_ops([req])
        elif not req.done.wait(timeout=OP_TIMEOUT_S):
            with self._cv:
                if req in self._ops:  # never taken: withdraw it, nothing changed
                    self._ops.remove(req)
                    raise RuntimeError(f"{what}: the engine did not run it within {OP_TIMEOUT_S:g} s; nothing changed")
            if not req.done.wait(timeout=OP_TIMEOUT_S):
                raise RuntimeError(f"{what}: the engine took it but did not finish within {2 * OP_TIMEOUT_S:g} s")
        if req.error is not None:
            raise req.error

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kaito-engine", daemon=True)
        self._thread.start()
        if self.prefill_thread:
            self._prefiller = threading.Thread(target=self._prefill_loop, name="kaito-prefill", daemon=True)
            self._prefiller.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self.runs.interrupt()
            self._cv.notify_all()
        for t in (self._thread, self._prefiller):
            if t is not None:
                t.join(timeout=30)
        self._fail_ops(EngineDead("the engine stopped before running it"))
        if self.broadcast is not None:  # after a fatal error the workers exit non-zero too
            self.broadcast(StepPlan(stop=True, error=None if self.error is None else repr(self.error)))

    @property
    def num_running(self) -> int:
        with self._cv:  # one snapshot: rows move between these lists on two threads (an unlocked sum read 2x the batch)
            return len(self.running) + self._pending_rows()

    def _pending_rows(self) -> int:
        """Sequences holding a batch slot outside `running`: being prefilled, or prefilled and not yet merged."""
        return len(self._inflight) + sum(len(g.rows) for g in self._ready) + self._merging

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the engine thread ----------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            capacity = self.max_batch_size * self.max_model_len
            self.metrics.record_scheduler(self.num_running, self.running, self.waiting, capacity)

    def _loop(self) -> None:
        failures = 0
        try:
            while self._wait_for_work():
                if ops := self._take_ops():
                    self._apply_ops(ops)
                try:
                    self.step()
                    failures = 0
                except EngineDead:
                    raise
                except Exception as e:
                    # Forwards and sampling contain their own faults (faults.ForwardGuard); what lands here is a
                    # fault outside them: it fails the running batch, not the server, unless it repeats or is
                    # the device's (or the workers' copies can no longer be trusted to match).
                    failures += 1
                    log.exception("engine step failed (%d in a row); aborting the running batch", failures)
                    if failures >= 3 or self.broadcast is not None or is_device_fault(e):
                        raise
                    self._abort_batch()
        except BaseException as e:  # the server must report, not hang, if a forward fails
            log.exception("engine loop failed")
            self._fail_all(e)

    def _wait_for_work(self) -> bool:
        """Block until there is work (True) or the engine stops (False); idle torchrun workers block in a
        collective, so a periodic no-op plan keeps it under its timeout. In one process, a quiet spell turns the
        CPU weight layout dense a layer at a time (`BatchExecutor.idle_layout`), checking for work between."""
        while True:
            with self._cv:
                while not (self._stop or self._has_work()):
                    if self.broadcast is not None:
                        timeout: float | None = 30
                    else:
                        timeout = IDLE_LAYOUT_S if self.ex.idle_layout_pending else None
                    if not self._cv.wait(timeout=timeout):
                        break
                if self._stop:
                    return False
                if self._has_work():
                    return True
            if self.broadcast is not None:
                self.guard.send(NOOP)
                continue
            try:
                self.ex.idle_layout()
            except Exception:  # e.g. no memory for a dense copy: the layout stays as it is, nothing is lost
                log.exception("turning the weight layout dense while idle failed; keeping the layout as it is")
                self.ex.freeze_layout()

    def _has_work(self) -> bool:
        return bool(self.running or self._ready or self._ops or (self.waiting and self._prefiller is None))

    def _take_ops(self) -> list[_AdapterRequest]:
        with self._cv:
            reqs = list(self._ops)
            self._ops.clear()
        return reqs

    def _apply_ops(self, reqs: list[_AdapterRequest]) -> None:
        """Apply adapter changes here, then send the ones that worked to the workers; a change that fails
        fails its own caller only. Every caller is answered, whatever happens."""
        applied = []
        try:
            for req in reqs:
                try:
                    with self._model_lock:  # never while the prefill thread runs a forward through the hooks
                        if req.op.kind == "unload":
                            self.ex.lora.remove(req.op.name)
                        elif req.adapter is None:
                            raise ValueError(f"adapter load of {req.op.name}: no adapter was given to install")
                        else:
                            self.ex.lora.add(req.adapter)
                    applied.append(req.op)
                except Exception as e:  # a bad adapter fails its own load request, not the engine
                    req.error = e
            if applied:
                self.guard.send(StepPlan(keep=tuple(range(self.ex.batch_size)), ops=tuple(applied)))
        except BaseException as e:  # the broadcast failed: the workers' adapters are unknown, the engine ends
            for req in reqs:
                req.error = req.error or EngineDead(f"adapter {req.op.kind} of {req.op.name}: {e!r}")
            raise
        finally:
            for req in reqs:
                req.done.set()

    def _fail_ops(self, error: BaseException) -> None:
        for req in self._take_ops():
            req.error = error
            req.done.set()

    def _abort_batch(self) -> None:
        """After a step failed outside the guarded forwards: the running and admitted rows end with "error"."""
        self.step_failures += 1
        with self._cv:
            for s in list(self.running) + self._admitting:
                if s.finish_reason is None:
                    self.output.finish(s, "error", self._outbox)
            self.running, self._admitting = [], []
        self.ex.reset()
        flush(self._outbox)

    def _fail_all(self, e: BaseException) -> None:
        """The engine cannot go on: every sequence it holds ends with an error, and both threads stop."""
        with self._cv:
            self.error, self._stop = e, True
            self._cv.notify_all()
            stuck = list(self.running) + self._admitting + list(self.waiting) + self._inflight
            stuck += [s for g in self._ready for s in g.rows]
        flush(self._outbox)
        self._fail_ops(EngineDead(f"the engine stopped after {e!r}"))
        for s in stuck:
            if s.finish_reason is None:
                s.finish_reason = "error"
                s.push(Finished("error", len(s.prompt_ids), len(s.output_ids)))
        if self.on_fatal is not None:
            self.on_fatal(e)

    def _fail_rows(self, rows: list[Sequence], outbox: list | None = None) -> None:
        """The guard's verdict: these rows' forward failed alone; they end with "error"."""
        self.step_failures += 1
        for s in rows:
            if s.finish_reason is None:
                self.output.finish(s, "error", self._outbox if outbox is None else outbox)

    def _advance(self, seqs: list[Sequence], logits, outbox: list | None = None) -> None:
        """Sample the rows' next tokens (a row whose sampling fails alone ends with "error") and hand them on."""
        outbox = self._outbox if outbox is None else outbox
        tokens, infos, failed = sample_rows(logits, seqs, self.output.eos_ids)
        for i in failed:
            self.step_failures += 1
            self.output.finish(seqs[i], "error", outbox)
        self.output.append(seqs, tokens, infos, outbox)

    def step(self) -> None:
        """One step: merge what the prefill thread prefilled, evict, decode the running rows by one token,
        then (without the prefill thread) admit arrivals. Decoding first: a request that arrived during the
        decode is admitted in the same step, and running streams get their token before any prefill work."""
        self._merge_ready()
        decode_s = self._evict_and_decode()
        if self._prefiller is None:  # else admissions are the prefill thread's job
            self._admit_inline(decode_s)
        self._gauges()

    def _merge_ready(self) -> None:
        with self._cv:
            # Rows being merged stay counted as busy (`_merging`): the prefill thread must not see their slots free.
            ready, self._ready = self._ready, []
            self._merging = sum(len(g.rows) for g in ready)
        for g in ready:
            try:
                self.ex.merge(g.kv, g.mask, g.pos, [s.lora for s in g.rows])
                merged = g.rows
            except Exception as e:  # e.g. no memory for a bigger cache: these rows fail, the batch goes on
                merged = []
                self.guard.contain(e, g.rows)
            with self._cv:
                self.running = self.running + merged
                self._merging -= len(g.rows)

    def _evict_and_decode(self) -> float | None:
        """Run the scheduler's evictions and decode; returns the decode's seconds per step (None: nothing decoded)."""
        with self._cv:
            ev = self.scheduler.evictions(self.running, self.ex.batch_size)
            for i in ev.aborted:
                self.output.finish(self.running[i], "abort", self._outbox)
            freed = len(self.running) > len(ev.keep)
            self.running = [self.running[i] for i in ev.keep]
            if freed and self.waiting and self._prefiller is not None:
                self._cv.notify_all()  # the prefill thread may have been waiting for room
            self._drop_cancelled_waiting(self._outbox)
            idle = not (self.waiting or self._ready or self._ops or self._stop)
            run = self.runs.steps(ev.plan, self.running, self.eos_ids, idle, self.broadcast is None) if ev.plan is not None else 0
        self.steps += 1
        if ev.plan is None:
            flush(self._outbox)
            return None
        t0 = time.perf_counter()
        steps = self.guard.decode_run(ev.plan, self.running, self.runs.forward(self.ex, self.running, run, self.eos_ids,
                                                                            self.output),
                                      lambda rows, picks: self.runs.accept(self.output, rows, picks, self._outbox)) if run else 0
        if not steps:
            steps = 1
            self.guard.decode(ev.plan.after_evict() if run else ev.plan, self.running, self._advance)
        decode_s = (time.perf_counter() - t0) / steps
        flush(self._outbox)
        return decode_s if ev.plan.decode else None

    def _admit_inline(self, decode_s: float | None) -> None:
        """Admit and prefill arrivals on the engine thread, within the scheduler's budget; the queue is looked at
        again after each admission, so requests that arrive during a prefill still get in this step."""
        tokens, seconds, free = self.scheduler.inline_budget(decode_s)
        deadline = None if seconds is None else time.perf_counter() + seconds
        first = True
        while admitted := self._admit(self._room(), tokens,
                                      None if deadline is None else deadline - time.perf_counter(), first, free):
            first = False
            n = sum(len(s.prompt_ids) for s in admitted)
            tokens, free = tokens - n, max(0, free - n)
            self._prefill(admitted)
            if deadline is None:
                break
        flush(self._outbox)

    def _prefill(self, admitted: list[Sequence]) -> None:
        """Prefill admitted rows chunk by chunk; each chunk's first tokens go out as soon as it is prefilled, so
        a burst of arrivals is served in order instead of everyone waiting for the whole burst."""
        self._admitting = admitted
        done = 0
        for group in self.scheduler.chunks(admitted):
            t0 = time.perf_counter()
            self.guard.prefill(group, self._join)  # the group stays in `_admitting` meanwhile (cleanup on failure)
            done += len(group)
            self._admitting = admitted[done:]
            self.scheduler.learn_prefill(sum(len(s.prompt_ids) for s in group), time.perf_counter() - t0)
            flush(self._outbox)
        self._admitting = []

    def _join(self, rows: list[Sequence], logits) -> None:
        """Rows prefilled into the batch on the engine thread: they run from now on."""
        if self.metrics is not None:
            self.metrics.record_prefill(rows)
        self.running.extend(rows)
        self._advance(rows, logits)

    # ---- the prefill thread -----------------------------------------------------------
    def _prefill_loop(self) -> None:
        """Prefill arrivals while the engine thread decodes, and send their first tokens at once: an arrival
        waits only for its own forward (which reads the weights and no batch state) instead of the decode
        under way, and adds no prefill to every running stream's next step."""
        outbox: list = []
        while True:
            with self._cv:
                while not self._stop and not (self.waiting and self._room() > 0):
                    self._cv.wait()
                if self._stop:
                    return
                self._drop_cancelled_waiting(outbox)
                group = self._admit(*self.scheduler.apart_budget(self._room()))
                self._inflight = group
            flush(outbox)
            if not group:
                continue
            try:
                self.guard.prefill_apart(group, lambda rows, out: self._hand_over(rows, out, outbox), outbox)
            except EngineDead as e:
                flush(outbox)
                self._fail_all(e)
                return
            except Exception:  # outside the forwards (delivery): these rows fail, the thread goes on
                log.exception("prefill bookkeeping failed; failing its %d requests", len(group))
                for s in group:
                    if s.finish_reason is None:
                        self.output.finish(s, "error", outbox)
            flush(outbox)
            with self._cv:
                self._inflight = []
                self._cv.notify_all()
            self._gauges()

    def _hand_over(self, rows: list[Sequence], out, outbox: list) -> None:
        """Rows the prefill thread prefilled: first tokens out now, rows queued for the engine thread's merge."""
        logits, kv, mask, pos = out
        if self.metrics is not None:
            self.metrics.record_prefill(rows)
        self._advance(rows, logits, outbox)
        flush(outbox)
        with self._cv:  # one lock: the rows never count twice (in-flight and ready) for the gauges
            self._ready.append(_Prefilled(rows, kv, mask, pos))
            self._inflight = [s for s in self._inflight if s not in rows]
            self.runs.interrupt()
            self._cv.notify_all()

    # ---- shared by both threads -------------------------------------------------------
    def _room(self) -> int:
        return self.scheduler.room(len(self.running) + self._pending_rows())

    def _admit(self, max_rows: int, max_tokens: int, time_left: float | None = None,
               first: bool = True, free_tokens: int = 0) -> list[Sequence]:
        """Take the scheduler's admissions from the front of the queue."""
        with self._cv:
            n = self.scheduler.admissions(self.waiting, max_rows, max_tokens, time_left, first, free_tokens)
            admitted = [self.waiting.popleft() for _ in range(n)]
        if self.metrics is not None:
            self.metrics.record_scheduled(admitted)
        return admitted

    def _drop_cancelled_waiting(self, outbox: list) -> None:
        """Sequences cancelled while waiting never run (caller holds the lock)."""
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self.output.finish(s, "abort", outbox)


def run_to_completion(engine: Engine, seqs: list[Sequence]) -> list[tuple[list[int], str, str]]:
    """Synchronous helper for tests/bench without a loop thread: step until all finish."""
    engine.submit(seqs)
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return [(s.output_ids, s.text, s.finish_reason or "") for s in seqs]  # all set: the loop ran until they were


__all__ = ["Engine", "Finished", "QueueFull", "SamplingParams", "Sequence", "Token", "flush", "run_to_completion"]
