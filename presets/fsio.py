"""Atomic file writes: a file appears whole under its final name or not at all.

For files written in one go that a kill must not leave half-written. Called
by the image builder (push upload sessions, a layout's index.json and marker,
the layer digest cache, pull markers and state), `kaito.presets.hub` (the
download-complete marker) and `kaito.tuning.output` (the completion sentinel,
the pushed digest). Each write goes to a sibling temporary file, is fsynced
(optional for caches) and `os.replace`d over the final name; the temporary
name is unique per process and thread, so two writers of the same file never
share one. Whole folders (checkpoints, weights, pulled images) and streamed
downloads are renamed into place by their owners.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import IO, Any, Iterator


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def atomic_file(path: os.PathLike | str, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Yield a file to write; on success it replaces `path`, on any error it is removed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable: without this a crash can bring back the old file, or none."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every filesystem lets a directory be opened; the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: os.PathLike | str, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: os.PathLike | str, text: str, *, fsync: bool = True) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: os.PathLike | str, obj: Any, *, fsync: bool = True, **dumps: Any) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps), fsync=fsync)
