"""The continuous-batching scheduler: admits, decodes, samples, detokenizes and stops sequences.

Called by the serving layer (`kaito.runtime.serving`): `submit()` queues
sequences (QueueFull beyond `max_waiting`, the API turns it into 429),
`cancel()` frees a sequence's slot (client disconnects), and each sequence's
`events` asyncio queue receives `Token`s and one `Finished`. The loop runs on
its own thread so forwards never block the event loop. Every step it evicts
finished/cancelled rows, prefills newly admitted sequences in chunks of at most
`prefill_chunk_tokens` and sends each chunk's first tokens at once (low TTFT in
a burst), then decodes the rows that were already running by one token (unless
more requests arrived meanwhile: then that decode waits one step); under
torchrun each step's plan is broadcast first so worker ranks run the same
forwards. The hot path stays lean: all-greedy batches take one argmax, and
detokenization calls the Rust tokenizer directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from kaito.runtime.executor import BatchExecutor
from kaito.runtime.lora import LoraAdapter, RowSpec
from kaito.runtime.sampling import SamplingParams, sample

log = logging.getLogger("kaito.runtime.engine")
_ids = itertools.count()


class QueueFull(Exception):
    """More requests are waiting than settings.max_waiting allows."""


@dataclass
class Token:
    token_id: int
    text: str  # text released by this token (may be "" while a stop string or UTF-8 char is pending)
    logprob: tuple[float, list[tuple[int, float]]] | None = None


@dataclass
class Finished:
    reason: str  # stop | length | abort (client gone) | error (the engine failed this step)
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    lora: RowSpec = ()
    loop: asyncio.AbstractEventLoop | None = None
    index: int = 0  # choice index within its request
    queue: asyncio.Queue | None = None  # shared by the choices of one request
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    pending: int | None = None  # sampled token not yet fed to the model
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    _prefix: int = 0
    _read: int = 0

    def __post_init__(self):
        self.events: asyncio.Queue = self.queue if self.queue is not None else asyncio.Queue()
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.params.seed))

    def _push(self, item, outbox: list | None = None) -> None:
        """Deliver (choice index, Token | Finished) to the request's queue on its event loop.

        With an outbox the delivery waits for `flush()`, so one engine step wakes the loop once, not per row.
        """
        if self.loop is None:
            self.events.put_nowait((self.index, item))
        elif outbox is not None:
            outbox.append((self, item))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, item))


def _deliver(items: list) -> None:
    for seq, item in items:
        seq.events.put_nowait((seq.index, item))


def flush(outbox: list) -> None:
    """Hand a step's events to their event loops, one wake-up per loop."""
    by_loop: dict = {}
    for seq, item in outbox:
        by_loop.setdefault(seq.loop, []).append((seq, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that loop is closed (server shutting down): nobody is listening
            pass
    outbox.clear()


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


def _fast_decode(tok) -> Callable[[list[int]], str]:
    """decode(ids, skip_special_tokens=True), straight to the Rust tokenizer when that gives the same text.

    transformers' wrapper (type conversion, kwargs) costs several times the decode itself, once per row
    and token; it only adds work when clean_up_tokenization_spaces is set.
    """
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tok, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


class Engine:
    def __init__(self, executor: BatchExecutor, tokenizer, *, eos_ids: list[int], max_model_len: int,
                 max_batch_size: int = 32, max_waiting: int = 256, metrics=None,
                 broadcast: Callable[[dict], None] | None = None, max_prefill_tokens: int = 4096,
                 prefill_chunk_tokens: int = 128):
        self.ex = executor
        self.tok = tokenizer
        self.eos_ids = list(eos_ids)
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
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
        self._deferred = False  # the last step skipped its decode to admit new arrivals first
        self.error: BaseException | None = None

    @property
    def tok(self):
        return self._tok

    @tok.setter
    def tok(self, tokenizer) -> None:
        self._tok, self._decode = tokenizer, _fast_decode(tokenizer)

    # ---- called from the event loop -------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences of one request together; all or none (QueueFull)."""
        with self._cv:
            # Rows that finished in the last step still sit in `running` until the next evicts them.
            busy = sum(1 for s in self.running if s.finish_reason is None)
            if len(self.waiting) + len(seqs) > self.max_waiting + max(0, self.max_batch_size - busy):
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self.waiting.extend(seqs)
            self._cv.notify()
        self._gauges()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cv:
            for s in seqs:
                if s.finish_reason is None:
                    s.cancelled = True
            self._cv.notify()

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Install an adapter between steps (workers re-read it from the same path)."""
        self._run_op(("load", adapter))

    def remove_adapter(self, name: str) -> None:
        self._run_op(("unload", name))

    def _run_op(self, op: tuple) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._apply_ops([op])
            return
        done = threading.Event()
        with self._cv:
            self._ops.append((op, done))
            self._cv.notify()
        done.wait(timeout=60)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kaito-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.broadcast is not None:
            self.broadcast({"stop": True})

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the engine thread ----------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))

    def _apply_ops(self, ops: list) -> list:
        wire = []
        for op in ops:
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
                    while not (self._stop or self.waiting or self.running or self._ops):
                        # Idle workers block in a collective; a periodic no-op keeps it under its timeout.
                        if not self._cv.wait(timeout=30 if self.broadcast else None):
                            idle = True
                            break
                    if self._stop:
                        break
                if idle:
                    self.broadcast({"noop": True})
                    continue
                with self._cv:
                    ops = list(self._ops)
                    self._ops.clear()
                if ops:
                    wire = self._apply_ops([o for o, _ in ops])
                    if self.broadcast is not None:
                        self.broadcast({"keep": list(range(len(self.running))), "decode": [], "prefill": [], "ops": wire})
                    for _, done in ops:
                        done.set()
                try:
                    self.step()
                    failures = 0
                except Exception:
                    # One bad step (e.g. NaN logits) fails the requests in the batch, not the server; a
                    # failure that repeats (device lost) stops the engine and /health turns 503.
                    failures += 1
                    log.exception("engine step failed (%d in a row); aborting the running batch", failures)
                    if failures >= 3 or self.broadcast is not None:
                        raise
                    self.step_failures += 1
                    for s in list(self.running) + self._admitting:
                        if s.finish_reason is None:
                            self._finish(s, "error")
                    self.running, self._admitting = [], []
                    self.ex.reset()
                    flush(self._outbox)
        except BaseException as e:  # the server must report, not hang, if a forward fails
            log.exception("engine loop failed")
            self.error = e
            flush(self._outbox)
            for s in list(self.running) + self._admitting + list(self.waiting):
                s.finish_reason = "error"
                s._push(Finished("error", len(s.prompt_ids), len(s.output_ids)))

    def step(self) -> None:
        """One scheduling step: evict, prefill admissions and send their first tokens, decode the running rows."""
        with self._cv:
            keep = _fill_holes([s.finish_reason is None and not s.cancelled for s in self.running])
            for s in self.running:
                if s.cancelled and s.finish_reason is None:
                    self._finish(s, "abort")
            self.running = [self.running[i] for i in keep]
            # Cancelled while waiting: never run.
            for s in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(s)
                self._finish(s, "abort")
            admitted: list[Sequence] = []
            budget = self.max_prefill_tokens
            while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
                nxt = self.waiting[0]
                if admitted and len(nxt.prompt_ids) > budget:
                    break
                budget -= len(nxt.prompt_ids)
                admitted.append(self.waiting.popleft())
        decoding = self.running
        chunks = _chunks([len(s.prompt_ids) for s in admitted], self.prefill_chunk_tokens)
        plan = {
            "keep": keep,
            "decode": [s.pending for s in decoding],
            "prefill": [(s.prompt_ids, [list(x) for x in s.lora]) for s in admitted],
            "chunks": chunks,
        }
        self._admitting = admitted
        if self.broadcast is not None:
            self.broadcast(plan)
        # The same order as BatchExecutor.apply (which worker ranks replay): evict, prefill, decode.
        self.ex.evict(keep)
        self.steps += 1
        self.running = list(decoding)
        done = 0
        for size in chunks:
            # Each chunk's first tokens go out as soon as it is prefilled: a burst of arrivals is served
            # in order instead of everyone waiting for the whole burst (and nobody waits for a decode).
            group = admitted[done:done + size]
            pre = self.ex.prefill([s.prompt_ids for s in group], [s.lora for s in group])
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in group))
            self.running.extend(group)
            self._admitting = admitted[done + size:]
            done += size
            self._advance(group, pre)
            flush(self._outbox)
        if decoding and self.broadcast is None and not self._deferred and self._room_for_arrivals():
            # Requests arrived during this step's prefill (a burst being parsed): admit them in the next step
            # before this decode, so their first tokens do not wait for it; a step never defers twice in a
            # row, so running rows still advance at least every other step.
            self._deferred = True
            self._gauges()
            return
        self._deferred = False
        if decoding:
            self._advance(decoding, self.ex.decode(plan["decode"]))
        flush(self._outbox)
        self._gauges()

    def _room_for_arrivals(self) -> bool:
        with self._cv:
            return bool(self.waiting) and len(self.running) < self.max_batch_size

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens, infos = sample(logits, seqs, [] if not self.eos_ids else self.eos_ids)
        now = time.monotonic()
        for s, t, info in zip(seqs, tokens, infos):
            if s.finish_reason is not None or s.cancelled:
                continue
            if self.metrics is not None:
                if s.first_token_at is None:
                    self.metrics.ttft.observe(now - s.arrival)
                else:
                    self.metrics.itl.observe(now - s.last_token_at)
                self.metrics.generation_tokens.inc()
            if s.first_token_at is None:
                s.first_token_at = now
            s.last_token_at = now
            s.output_ids.append(t)
            reason = None
            stopped_by_string = False
            if t in self.eos_ids and not s.params.ignore_eos:
                reason = "stop"
            else:
                self._detok(s, final=False)
                if s.params.stop:
                    reason = self._check_stop(s)
                    stopped_by_string = reason is not None
            if reason is None and len(s.output_ids) >= s.params.max_tokens:
                reason = "length"
            if reason is None and len(s.prompt_ids) + len(s.output_ids) >= self.max_model_len:
                reason = "length"
            if reason is not None:
                if not stopped_by_string and s._read < len(s.output_ids):
                    self._detok(s, final=True)  # flush bytes held back for an unfinished character
                    if s.params.stop:
                        self._check_stop(s)
                s._push(Token(t, self._release(s, final=True), info), self._outbox)
                self._finish(s, reason)
            else:
                s.pending = t
                s._push(Token(t, self._release(s, final=False), info), self._outbox)

    def _detok(self, s: Sequence, final: bool) -> str:
        """Incremental detokenization (prefix/read offsets) so multi-byte characters are never split."""
        ids = s.output_ids
        prev = self._decode(ids[s._prefix:s._read])
        new = self._decode(ids[s._prefix:])
        if len(new) > len(prev) and (final or not new.endswith("\ufffd")):
            delta = new[len(prev):]
            s.text += delta
            s._prefix, s._read = s._read, len(ids)
            return delta
        return ""

    def _check_stop(self, s: Sequence) -> str | None:
        longest = max(len(x) for x in s.params.stop)
        window_start = max(0, s.emitted - longest)
        hits = [(s.text.find(x, window_start), x) for x in s.params.stop]
        hits = [(i, x) for i, x in hits if i >= 0]
        if hits:
            s.text = s.text[: min(i for i, _ in hits)]
            return "stop"
        return None

    def _release(self, s: Sequence, final: bool) -> str:
        """Text safe to send now: hold back what could still become a stop string."""
        hold = 0 if final or not s.params.stop else max(len(x) for x in s.params.stop) - 1
        upto = max(s.emitted, len(s.text) - hold)
        out = s.text[s.emitted:upto]
        s.emitted = upto
        return out

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        if self.metrics is not None:
            self.metrics.success.labels(finished_reason=reason).inc()
            self.metrics.e2e.observe(time.monotonic() - s.arrival)
        s._push(Finished(reason, len(s.prompt_ids), len(s.output_ids)), self._outbox)


def run_to_completion(engine: Engine, seqs: list[Sequence]) -> list[tuple[list[int], str, str]]:
    """Synchronous helper for tests/bench without a loop thread: step until all finish."""
    engine.submit(seqs)
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return [(s.output_ids, s.text, s.finish_reason) for s in seqs]


__all__ = ["Any", "Engine", "Finished", "QueueFull", "SamplingParams", "Sequence", "Token", "run_to_completion"]
