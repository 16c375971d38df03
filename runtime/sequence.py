"""One generation's state and the events it sends: Sequence, Token, Finished, and their delivery.

Created by the serving layer (`kaito.runtime.serving`), one per choice of a request, and advanced by the
engine's threads (`kaito.runtime.engine`, text and stop handling in `kaito.runtime.output`). `Token` and
`Finished` events reach each request's asyncio queue through `flush()`, one wake-up per event loop per
engine step. The admission errors the engine raises to the serving layer live here too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    lora: tuple[tuple[str, float], ...] = ()  # kaito.runtime.lora.RowSpec
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
    generator: Any = None  # torch.Generator of a seeded request
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    scheduled_at: float | None = None  # left the queue for a prefill (metrics: queue and prefill time)
    # Incremental detokenization (kaito.runtime.output.detok): offsets into detok_tail + output_ids, where
    # detok_tail is the prompt's last tokens (set at the first token).
    detok_prefix: int = 0
    detok_read: int = 0
    detok_tail: list[int] | None = None

    def __post_init__(self):
        self.events: asyncio.Queue = self.queue if self.queue is not None else asyncio.Queue()
        if self.params.seed is not None:
            import torch  # only seeded requests need it; the scheduler's tests build sequences without torch

            # manual_seed takes [-2**63, 2**64); any integer seed maps into that range instead of overflowing.
            self.generator = torch.Generator().manual_seed(int(self.params.seed) % (1 << 64))

    def push(self, item, outbox: list | None = None) -> None:
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
