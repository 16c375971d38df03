"""The continuous-batching scheduler: admits, prefills, decodes, samples and stops sequences.

Called by the serving layer (`kaito.runtime.serving`): `submit()` queues
sequences (QueueFull beyond `max_waiting`, the API turns it into 429),
`cancel()` frees a sequence's slot (client disconnects), and each sequence's
`events` asyncio queue receives `Token`s and one `Finished` (types and text
handling in `kaito.runtime.sequence`). Forwards never run on the event loop:
the engine thread evicts finished/cancelled rows and decodes the running batch
by one token per step; the prefill thread prefills arrivals meanwhile (one
prompt per forward while the batch decodes, chunks of at most
`prefill_chunk_tokens` into an idle batch), sends their first tokens at once,
and hands the rows over to be merged between two decode steps. Without the
prefill thread (under torchrun, where every rank replays one serial plan
broadcast before each forward, or for rotary embeddings that rescale by length)
a step decodes first and then admits arrivals, prefilling at most
`prefill_step_ratio` times the decode's time. The hot path stays lean:
all-greedy batches take one argmax, and detokenization calls the Rust
tokenizer directly.

No request can stop the engine (`kaito.runtime.faults`): a forward over
several rows that fails is retried row by row, so only the rows that fail
alone end with "error"; sampling is isolated the same way, and under torchrun
every rank runs the same retries (rank 0 broadcasts them). Only a fault of the
device or of the torchrun group stops the engine, and then `on_fatal` lets the
server process exit non-zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.faults import ContainedForwards, FaultHook, env_fault_hook, is_device_fault, sample_rows
from kaito.runtime.lora import LoraAdapter
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import (
    EngineDead,
    Finished,
    NeverFits,
    QueueFull,
    Sequence,
    Token,
    fast_decode,
    check_stop,
    detok,
    flush,
    release,
)

log = logging.getLogger("kaito.runtime.engine")


def _chunks(lengths: list[int], budget: int) -> list[int]:
    """Split admitted prompts (in order) into prefill forwards of at most `budget` tokens (one prompt at least)."""
    sizes: list[int] = []
    used = budget
    for n in lengths:
        if sizes and used + n <= budget:
            sizes[-1] += 1
            used += n
        else:
            sizes.append(1)
            used = n
    return sizes


def _fill_holes(alive: list[bool]) -> list[int]:
    """New batch order after evictions: survivors stay in place and the last survivors move into the
    holes, so the executor copies one cache row per evicted row instead of shifting every later row."""
    n = sum(alive)
    keep = [i if i < n and alive[i] else -1 for i in range(n)]
    tail = iter(i for i in range(n, len(alive)) if alive[i])
    return [i if i >= 0 else next(tail) for i in keep]


class Engine(ContainedForwards):
    def __init__(self, executor: BatchExecutor, tokenizer, *, eos_ids: list[int], max_model_len: int,
                 max_batch_size: int = 32, max_waiting: int = 256, metrics=None,
                 broadcast: Callable[[dict], None] | None = None, max_prefill_tokens: int = 4096,
                 prefill_chunk_tokens: int = 128, prefill_step_ratio: float = 1.0, prefill_thread: bool = False):
        self.ex = executor
        self.tok = tokenizer
        self.eos_ids = list(eos_ids)
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_step_ratio = prefill_step_ratio
        self._prefill_s_per_token: float | None = None  # learned from this engine's own prefills
        self.metrics = metrics
        self.broadcast = broadcast
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ops: deque[tuple] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_failures = 0
        self._admitting: list[Sequence] = []  # taken from `waiting`, not yet in `running` (failure cleanup)
        self._outbox: list = []  # events of the current step, flushed at its end
        self.error: BaseException | None = None
        # The prefill thread (see `_prefill_loop`): sequences it is prefilling, and prefilled groups
        # (seqs, kv, mask, pos) waiting for the engine thread to merge them into the batch.
        self.prefill_thread = prefill_thread and broadcast is None
        self._prefiller: threading.Thread | None = None
        self._inflight: list[Sequence] = []
        self._ready: list[tuple] = []
        self._model_lock = threading.Lock()  # adapter (un)loading vs a prefill forward on the other thread
        self._merging = 0  # rows taken from `_ready` and not yet in `running` (counted as busy meanwhile)
        self.fault_hook: FaultHook | None = env_fault_hook(tokenizer)  # tests: make chosen rows' forwards fail
        self.on_fatal: Callable[[BaseException], None] | None = None  # the server: exit the process

    @property
    def tok(self):
        return self._tok

    @tok.setter
    def tok(self, tokenizer) -> None:
        self._tok, self._decode = tokenizer, fast_decode(tokenizer)

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
            if len(self.waiting) + len(seqs) > self.max_waiting + max(0, self.max_batch_size - busy):
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self.waiting.extend(seqs)
            self._cv.notify_all()
        self._gauges()

    def check_fits(self, rows: int) -> None:
        """NeverFits when one request's `rows` sequences could never be held at once, however long they waited
        (the serving layer checks a multi-prompt request as a whole with this before submitting any prompt)."""
        if rows > self.max_batch_size + self.max_waiting:
            raise NeverFits(f"this request needs {rows} sequences at once (prompts x n), over this server's limit of "
                            f"max_batch_size + max_waiting = {self.max_batch_size} + {self.max_waiting}; "
                            "send fewer prompts or a smaller n per request")

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cv:
            for s in seqs:
                if s.finish_reason is None:
                    s.cancelled = True
            self._cv.notify_all()

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Install an adapter between steps (workers re-read it from the same path)."""
        self._run_op(("load", adapter))

    def remove_adapter(self, name: str) -> None:
        self._run_op(("unload", name))

    def _run_op(self, op: tuple) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._apply_ops([op])
            return
        done, error = threading.Event(), []
        with self._cv:
            self._ops.append((op, done, error))
            self._cv.notify_all()
        # The caller records the adapter as loaded only when this returns: a failure or a stuck engine must say so.
        if not done.wait(timeout=60):
            raise RuntimeError(f"adapter {op[0]} of {getattr(op[1], 'name', op[1])}: the engine did not run it within 60 s")
        if error:
            raise error[0]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kaito-engine", daemon=True)
        self._thread.start()
        if self.prefill_thread:
            self._prefiller = threading.Thread(target=self._prefill_loop, name="kaito-prefill", daemon=True)
            self._prefiller.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in (self._thread, self._prefiller):
            if t is not None:
                t.join(timeout=30)
        if self.broadcast is not None:  # after a fatal error the workers exit non-zero too
            self.broadcast({"stop": True, **({"error": repr(self.error)} if self.error is not None else {})})

    @property
    def num_running(self) -> int:
        with self._cv:  # one snapshot: rows move between these lists on two threads (an unlocked sum read 2x the batch)
            return len(self.running) + self._pending_rows()

    def _pending_rows(self) -> int:
        """Sequences holding a batch slot outside `running`: being prefilled, or prefilled and not yet merged."""
        return len(self._inflight) + sum(len(g[0]) for g in self._ready) + self._merging

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the engine thread ----------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.record_scheduler(self.num_running, self.running, self.waiting, self.max_batch_size * self.max_model_len)

    def _apply_ops(self, ops: list) -> list:
        wire = []
        for op in ops:
            with self._model_lock:  # never while the prefill thread runs a forward through the hooks
                if op[0] == "load":
                    self.ex.lora.add(op[1])
                    wire.append(("load", op[1].name, str(op[1].path)))
                else:
                    self.ex.lora.remove(op[1])
                    wire.append(("unload", op[1]))
        return wire

    def _loop(self) -> None:
        failures = 0
        try:
            while True:
                with self._cv:
                    idle = False
                    while not (self._stop or self.running or self._ready or self._ops
                               or (self.waiting and self._prefiller is None)):
                        # Idle workers block in a collective; a periodic no-op keeps it under its timeout.
                        if not self._cv.wait(timeout=30 if self.broadcast else None):
                            idle = True
                            break
                    if self._stop:
                        break
                if idle:
                    self._send({"noop": True})
                    continue
                with self._cv:
                    ops = list(self._ops)
                    self._ops.clear()
                if ops:
                    wire = []
                    for op, _, error in ops:
                        try:
                            wire += self._apply_ops([op])
                        except Exception as e:  # a bad adapter fails its own load request, not the engine
                            error.append(e)
                    self._send({"keep": list(range(len(self.running))), "decode": [], "prefill": [], "ops": wire})
                    for _, done, _ in ops:
                        done.set()
                try:
                    self.step()
                    failures = 0
                except EngineDead:
                    raise
                except Exception as e:
                    # Forwards and sampling contain their own faults (see _contain); what lands here is a fault
                    # outside them: it fails the running batch, not the server, unless it repeats or is the device's.
                    failures += 1
                    log.exception("engine step failed (%d in a row); aborting the running batch", failures)
                    if failures >= 3 or self.broadcast is not None or is_device_fault(e):
                        raise
                    self.step_failures += 1
                    with self._cv:
                        for s in list(self.running) + self._admitting:
                            if s.finish_reason is None:
                                self._finish(s, "error")
                        self.running, self._admitting = [], []
                    self.ex.reset()
                    flush(self._outbox)
        except BaseException as e:  # the server must report, not hang, if a forward fails
            log.exception("engine loop failed")
            self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        """The engine cannot go on: every sequence it holds ends with an error, and both threads stop."""
        with self._cv:
            self.error, self._stop = e, True
            self._cv.notify_all()
            stuck = list(self.running) + self._admitting + list(self.waiting) + self._inflight
            stuck += [s for g in self._ready for s in g[0]]
        flush(self._outbox)
        for s in stuck:
            if s.finish_reason is None:
                s.finish_reason = "error"
                s._push(Finished("error", len(s.prompt_ids), len(s.output_ids)))
        if self.on_fatal is not None:
            self.on_fatal(e)

    def step(self) -> None:
        """One scheduling step: evict, decode the running rows by one token, then admit and prefill arrivals.

        Decoding first means a request that arrived during the decode is admitted at the end of the same
        step (not one whole step later), and running streams get their token before any prefill work.
        While rows are decoding, the admissions' estimated prefill time is held to `prefill_step_ratio`
        times this step's decode time (one prompt at least): a burst is admitted over a few steps, running
        streams keep their pace, and clients that arrived together stop moving in lock-step, so later
        arrivals find a short queue instead of a whole burst ahead of them (Sarathi-style stall-free batching).
        """
        with self._cv:
            # Rows being merged stay counted as busy (`_merging`): the prefill thread must not see their slots free.
            ready, self._ready = self._ready, []
            self._merging = sum(len(g[0]) for g in ready)
        for group, kv, mask, pos in ready:
            try:
                self.ex.merge(kv, mask, pos, [s.lora for s in group])
                merged = group
            except Exception as e:  # e.g. no memory for a bigger cache: these rows fail, the batch goes on
                merged = []
                self._contain(e, group)
            with self._cv:
                self.running = self.running + merged
                self._merging -= len(group)
        with self._cv:
            keep = _fill_holes([s.finish_reason is None and not s.cancelled for s in self.running])
            for s in self.running:
                if s.cancelled and s.finish_reason is None:
                    self._finish(s, "abort")
            freed = len(self.running) > len(keep)
            self.running = [self.running[i] for i in keep]
            if freed and self.waiting and self._prefiller is not None:
                self._cv.notify_all()  # the prefill thread may have been waiting for room
            self._drop_cancelled_waiting(self._outbox)
        decoding = self.running
        self.steps += 1
        decode_s = 0.0
        if decoding or keep != list(range(len(keep))) or self.ex.batch_size != len(keep):
            # The same order as worker ranks replay it (`distributed.Replayer`): evict, then decode.
            plan = {"keep": keep, "decode": [s.pending for s in decoding], "prefill": []}
            self._send(plan)
            self.ex.evict(keep)
            if decoding:
                t0 = time.perf_counter()
                self._decode_step(decoding, plan["decode"])
                decode_s = time.perf_counter() - t0
                flush(self._outbox)
        if self._prefiller is not None:  # admissions are the prefill thread's job
            self._gauges()
            return
        # While rows decode, prefill may take `prefill_step_ratio` x this decode's time; the queue is looked at
        # again after each admission, so requests that arrive during a prefill still get in this step.
        deadline = time.perf_counter() + self.prefill_step_ratio * decode_s if decoding and self.prefill_step_ratio > 0 else None
        first = True
        while admitted := self._admit(self._room(), self.max_prefill_tokens,
                                      None if deadline is None else deadline - time.perf_counter(), first):
            first = False
            self._prefill(admitted)
            if deadline is None:
                break
        flush(self._outbox)
        self._gauges()

    def _prefill(self, admitted: list[Sequence]) -> None:
        chunks = _chunks([len(s.prompt_ids) for s in admitted], self.prefill_chunk_tokens)
        self._admitting = admitted
        done = 0
        for size in chunks:
            # Each chunk's first tokens go out as soon as it is prefilled: a burst of arrivals is served
            # in order instead of everyone waiting for the whole burst. Under torchrun, one plan per forward.
            group = admitted[done:done + size]
            self._send(self._prefill_plan(group))
            t0 = time.perf_counter()
            try:
                pre = self._guarded("prefill", group, lambda g=group: self.ex.prefill([s.prompt_ids for s in g], [s.lora for s in g]))
            except Exception as e:
                self._prefill_alone(group, e)  # the group stays in `_admitting` meanwhile (cleanup on EngineDead)
                pre = None
            if pre is not None:
                if self.metrics is not None:
                    self.metrics.record_prefill(group)
                self.running.extend(group)
            self._admitting = admitted[done + size:]
            done += size
            if pre is not None:
                self._advance(group, pre)
            self._learn_prefill(sum(len(s.prompt_ids) for s in group), time.perf_counter() - t0)
            flush(self._outbox)
        self._admitting = []

    # ---- the prefill thread -----------------------------------------------------------
    def _prefill_loop(self) -> None:
        """Prefill arrivals while the engine thread decodes, and send their first tokens at once.

        Why: on a busy batch an arrival would otherwise wait for the decode step under way and then add its
        prefill to the next one, for every running stream. Here it waits only for its own forward (the
        prompt's forward reads the weights and no batch state), and the engine thread merges the prefilled
        rows between two decode steps. Prompts are taken in arrival order, one chunk of at most
        `prefill_chunk_tokens` per forward, while the batch has room.
        """
        outbox: list = []
        while True:
            with self._cv:
                while not self._stop and not (self.waiting and self._room() > 0):
                    self._cv.wait()
                if self._stop:
                    return
                self._drop_cancelled_waiting(outbox)
                # While the batch decodes, one prompt per forward: an arrival's first token waits for no other
                # prompt, and arrivals spread over decode steps instead of moving in lock-step. Into an idle
                # batch a burst goes in chunks, sharing each forward's fixed cost.
                group = self._admit(self._room() if not self.running else 1,
                                    min(self.prefill_chunk_tokens, self.max_prefill_tokens))
                self._inflight = group
            flush(outbox)
            if not group:
                continue
            try:
                self._prefill_group(group, outbox)
            except EngineDead as e:
                flush(outbox)
                self._fail_all(e)
                return
            except Exception:  # outside the forwards (delivery): these rows fail, the thread goes on
                log.exception("prefill bookkeeping failed; failing its %d requests", len(group))
                for s in group:
                    if s.finish_reason is None:
                        self._finish(s, "error", outbox)
            flush(outbox)
            with self._cv:
                self._inflight = []
                self._cv.notify_all()
            self._gauges()

    def _room(self) -> int:
        return self.max_batch_size - len(self.running) - self._pending_rows()

    def _learn_prefill(self, tokens: int, seconds: float) -> None:
        """Running estimate of prefill seconds per prompt token (forward, sampling and delivery included)."""
        per = seconds / max(1, tokens)
        self._prefill_s_per_token = per if self._prefill_s_per_token is None else 0.8 * self._prefill_s_per_token + 0.2 * per

    def _admit(self, max_rows: int, max_tokens: int, time_left: float | None = None, first: bool = True) -> list[Sequence]:
        """Take waiting sequences in arrival order: at most `max_rows` rows and `max_tokens` prompt tokens and,
        when `time_left` is given, that much estimated prefill time; with `first` one is taken regardless."""
        per = self._prefill_s_per_token or 0.0
        admitted: list[Sequence] = []
        with self._cv:
            while self.waiting and len(admitted) < max_rows:
                n = len(self.waiting[0].prompt_ids)
                if not (first and not admitted) and (n > max_tokens or (time_left is not None and n * per > time_left)):
                    break
                max_tokens -= n
                if time_left is not None:
                    time_left -= n * per
                admitted.append(self.waiting.popleft())
        if self.metrics is not None:
            self.metrics.record_scheduled(admitted)
        return admitted

    def _drop_cancelled_waiting(self, outbox: list) -> None:
        """Sequences cancelled while waiting never run (caller holds the lock)."""
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self._finish(s, "abort", outbox)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, outbox: list | None = None) -> None:
        outbox = self._outbox if outbox is None else outbox
        tokens, infos, failed = sample_rows(logits, seqs, [] if not self.eos_ids else self.eos_ids)
        for i in failed:
            self.step_failures += 1
            self._finish(seqs[i], "error", outbox)
        now = time.monotonic()
        for s, t, info in zip(seqs, tokens, infos):
            if s.finish_reason is not None or s.cancelled:
                continue
            if self.metrics is not None:
                self.metrics.record_token(s, now)
            if s.first_token_at is None:
                s.first_token_at = now
            s.last_token_at = now
            s.output_ids.append(t)
            reason = None
            stopped_by_string = False
            if t in self.eos_ids and not s.params.ignore_eos:
                reason = "stop"
            else:
                detok(s, self._decode, final=False)
                if s.params.stop:
                    reason = check_stop(s)
                    stopped_by_string = reason is not None
            if reason is None and len(s.output_ids) >= s.params.max_tokens:
                reason = "length"
            if reason is None and len(s.prompt_ids) + len(s.output_ids) >= self.max_model_len:
                reason = "length"
            if reason is not None:
                if not stopped_by_string and s._read < len(s.output_ids):
                    detok(s, self._decode, final=True)  # flush bytes held back for an unfinished character
                    if s.params.stop:
                        check_stop(s)
                s._push(Token(t, release(s, final=True), info), outbox)
                self._finish(s, reason, outbox)
            else:
                s.pending = t
                s._push(Token(t, release(s, final=False), info), outbox)

    def _finish(self, s: Sequence, reason: str, outbox: list | None = None) -> None:
        s.finish_reason = reason
        if self.metrics is not None:
            self.metrics.record_finished(s, reason)
        s._push(Finished(reason, len(s.prompt_ids), len(s.output_ids)), self._outbox if outbox is None else outbox)


def run_to_completion(engine: Engine, seqs: list[Sequence]) -> list[tuple[list[int], str, str]]:
    """Synchronous helper for tests/bench without a loop thread: step until all finish."""
    engine.submit(seqs)
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return [(s.output_ids, s.text, s.finish_reason) for s in seqs]


__all__ = ["Any", "Engine", "Finished", "QueueFull", "SamplingParams", "Sequence", "Token", "flush", "run_to_completion"]
