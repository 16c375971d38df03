"""One generation's state and its text side: Sequence, the events it sends, incremental detokenization
and stop strings.

Used by the engine (`kaito.runtime.engine`), which re-exports the types the serving layer imports:
`Token` and `Finished` events reach each request's asyncio queue through `flush()`, one wake-up per
event loop per engine step. The text functions run on whichever engine thread advances the sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from kaito.runtime.lora import RowSpec
from kaito.runtime.sampling import SamplingParams

_ids = itertools.count()


class QueueFull(Exception):
    """More requests are waiting than settings.max_waiting allows (waiting helps: 429)."""


class NeverFits(ValueError):
    """A request the engine could never hold, however long it waited (more rows than max_batch_size +
    max_waiting, an empty prompt): the API answers 400 with this message, which names the limit."""


class EngineDead(RuntimeError):
    """A fault the engine cannot contain to one request (the device, a torchrun peer): the process must exit."""


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
    scheduled_at: float | None = None  # left the queue for a prefill (metrics: queue and prefill time)
    _prefix: int = 0
    _read: int = 0

    def __post_init__(self):
        self.events: asyncio.Queue = self.queue if self.queue is not None else asyncio.Queue()
        if self.params.seed is not None:
            # manual_seed takes [-2**63, 2**64); any integer seed maps into that range instead of overflowing.
            self.generator = torch.Generator().manual_seed(int(self.params.seed) % (1 << 64))

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


def fast_decode(tok) -> Callable[[list[int]], str]:
    """decode(ids, skip_special_tokens=True), straight to the Rust tokenizer when that gives the same text.

    transformers' wrapper (type conversion, kwargs) costs several times the decode itself, once per row
    and token; it only adds work when clean_up_tokenization_spaces is set.
    """
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tok, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def detok(s: Sequence, decode: Callable[[list[int]], str], final: bool) -> str:
    """Incremental detokenization (prefix/read offsets) so multi-byte characters are never split."""
    ids = s.output_ids
    prev = decode(ids[s._prefix:s._read])
    new = decode(ids[s._prefix:])
    if len(new) > len(prev) and (final or not new.endswith("\ufffd")):
        delta = new[len(prev):]
        s.text += delta
        s._prefix, s._read = s._read, len(ids)
        return delta
    return ""

def check_stop(s: Sequence) -> str | None:
    """Cut the text at the first stop string found near the unsent end; "stop" when one was."""
    longest = max(len(x) for x in s.params.stop)
    window_start = max(0, s.emitted - longest)
    hits = [(s.text.find(x, window_start), x) for x in s.params.stop]
    hits = [(i, x) for i, x in hits if i >= 0]
    if hits:
        s.text = s.text[: min(i for i, _ in hits)]
        return "stop"
    return None

def release(s: Sequence, final: bool) -> str:
    """Text safe to send now: hold back what could still become a stop string."""
    hold = 0 if final or not s.params.stop else max(len(x) for x in s.params.stop) - 1
    upto = max(s.emitted, len(s.text) - hold)
    out = s.text[s.emitted:upto]
    s.emitted = upto
    return out
