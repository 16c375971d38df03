"""Rich progress bars for the `kaito image` commands: one bar per layer (hash, upload, download) with bytes/s.

Implements kaito.image_builder.oci.progress.Progress; the CLI picks it unless
`--quiet`/`--json`. Bars are drawn on stderr so `--json` output stays clean.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichBars,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from kaito.image_builder.oci.progress import Advance, Progress


class _Bar:
    """Advance one bar; `resize` sets its real total (a layer's tar stream, not the file inside)."""

    def __init__(self, bars: RichBars, tid: TaskID) -> None:
        self.bars, self.tid = bars, tid

    def __call__(self, n: int) -> None:
        self.bars.advance(self.tid, n)

    def resize(self, total: int) -> None:
        self.bars.update(self.tid, total=total)


class RichProgress(Progress):
    def __init__(self) -> None:
        self.bars = RichBars(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.ids: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def task(self, key: str, description: str, total: int) -> Advance:
        with self.lock:
            tid = self.bars.add_task(description[:48], total=total or None, note="")
            self.ids[key] = tid
        return _Bar(self.bars, tid)

    def finish(self, key: str, note: str = "") -> None:
        with self.lock:
            tid = self.ids.get(key)
            if tid is None:
                tid = self.bars.add_task(key[:26], total=1, note="")
                self.ids[key] = tid
        task = self.bars.tasks[[t.id for t in self.bars.tasks].index(tid)]
        self.bars.update(tid, completed=task.total or 0, note=note)

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()
