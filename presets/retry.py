"""One retry policy for every network call the project makes.

Which failures are worth another try, how long to wait between tries, and how
a server's `Retry-After` bends that wait live here and nowhere else. Callers:
the registry client's retry transport (`image_builder/oci/transport.py`, its
policy built in `oci/remote.py`), blob pushes and pulls (`oci/push.py`,
`image_builder/pull.py`), the resumable downloader (`presets/download.py`,
used by `presets/hub.py` and by `tuning/fetch.py`, which passes it a
`Backoff`) and the operator's API client (`operator/kube.py`, through `acall`).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")

# Request timeout, too early, rate limited, and the 5xx a proxy or a busy
# server answers transiently. 501/505 say "never", so they are not here.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def retryable_status(status: Optional[int]) -> bool:
    """True for an HTTP status that another try may cure."""
    return status in RETRYABLE_STATUS


class TransientError(Exception):
    """A failure another try may cure: a retryable status or a dropped connection.

    Raise it (or a subclass) from the function given to `call`/`acall`; any other
    exception ends the retries at once. `retry_after` carries a server's
    `Retry-After` header, when it sent one.
    """

    def __init__(self, message: str, *, status: Optional[int] = None, retry_after: Optional[str] = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Parse `Retry-After` (delta-seconds or an HTTP date) into seconds, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped; `attempts` counts the first try."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, retry_after: Optional[str] = None) -> float:
        """Seconds to wait after the `failures`-th failed try (1-based)."""
        hinted = retry_after_seconds(retry_after)
        if hinted is not None:
            return min(hinted, self.cap)
        return min(self.cap, self.base * 2 ** (failures - 1) * (0.5 + random.random() / 2))


DEFAULT = Backoff()


def _wait_or_raise(
    policy: Backoff, failures: int, e: BaseException, on_retry: Optional[Callable[[BaseException, float], None]]
) -> float:
    """The wait before the next try, or `e` re-raised when the tries are spent."""
    if failures >= policy.attempts:
        raise e
    wait = policy.delay(failures, getattr(e, "retry_after", None))
    if on_retry is not None:
        on_retry(e, wait)
    return wait


def call(
    fn: Callable[[], T],
    *,
    policy: Backoff = DEFAULT,
    transient: tuple[type[BaseException], ...] = (TransientError,),
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Optional[Callable[[BaseException, float], None]] = None,
) -> T:
    """Run `fn` until it returns, a non-transient error escapes, or the tries run out.

    The last transient error is re-raised unchanged, so the caller's own message
    (what was being done, to which host) reaches the user.
    """
    failures = 0
    while True:
        try:
            return fn()
        except transient as e:
            failures += 1
            sleep(_wait_or_raise(policy, failures, e, on_retry))


async def acall(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: Backoff = DEFAULT,
    transient: tuple[type[BaseException], ...] = (TransientError,),
    on_retry: Optional[Callable[[BaseException, float], None]] = None,
) -> T:
    """`call` for coroutines: the waits are `asyncio.sleep`, so the event loop keeps running."""
    failures = 0
    while True:
        try:
            return await fn()
        except transient as e:
            failures += 1
            await asyncio.sleep(_wait_or_raise(policy, failures, e, on_retry))
