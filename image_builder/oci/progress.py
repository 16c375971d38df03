"""The progress interface the OCI library reports through (a rich implementation lives in kaito.image_builder.progress).

Library code asks for a task per blob and advances it with byte counts; the
null implementation keeps library calls silent (tests, `--quiet`, other packages).
An Advance may also have `resize(total)`: callers that learn the exact byte count
late (a file's tar stream is longer than the file) correct the total with it.
"""

from __future__ import annotations

from typing import Callable

Advance = Callable[[int], None]


class Progress:
    """Null progress: every call is a no-op."""

    def task(self, key: str, description: str, total: int) -> Advance:
        return lambda n: None

    def finish(self, key: str, note: str = "") -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        pass


NULL = Progress()
