"""Training data inputs: http(s) URLs, an image, or a directory -> one local data directory.

Called by `kaito tune fetch-data` (the tuning Job's init container, which
fills /mnt/data) and by the trainer when `--data` is not a directory. URL
downloads run in parallel with retries and exponential backoff, resume a
partial `.part` file with an HTTP Range request after a kill, stop at a size
limit, show progress, and appear under their final name only when complete.
URLs are logged without their query string: it often carries a SAS token.
Images are pulled with `kaito.image_builder.pull`; their files live under /data.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import unquote, urlsplit

import httpx
from kaito.presets.download import download as presets_download
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.images import DIGEST_PATTERN
from kaito.presets.retry import Backoff
from kaito.presets.validate import redact

DEFAULT_MAX_BYTES = 50 * 1024**3
_IMAGE_REF = re.compile(rf"^[a-z0-9]+([.-][a-z0-9]+)*(:\d+)?/[a-z0-9._/-]+(:[\w.-]+|@{DIGEST_PATTERN})$")


def file_name(url: str, index: int, taken: set[str]) -> str:
    name = unquote(Path(urlsplit(url).path).name) or f"data-{index}"
    name = re.sub(r"[^\w.-]", "_", name)
    if name in taken:
        name = f"{index}-{name}"
    taken.add(name)
    return name


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    retries: int = 5,
    backoff: float = 0.5,
    progress=None,
    task=None,
) -> Path:
    """Download url to dest, resuming dest.part with Range; dest appears only when complete."""
    show = (lambda done, total: progress.update(task, total=total, completed=done)) if progress is not None else None
    return presets_download(
        url,
        dest,
        client=client,
        max_bytes=max_bytes,
        progress=show,
        policy=Backoff(attempts=retries + 1, base=backoff),
    )


def fetch_urls(
    urls: Sequence[str],
    dest: Path,
    *,
    parallel: int = 4,
    retries: int = 5,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 60.0,
    show_progress: bool = True,
) -> list[Path]:
    """Download every URL into dest in parallel; returns the files in URL order."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    for u in urls:
        if urlsplit(u).scheme not in ("http", "https"):
            raise InvalidInput(f"--data {redact(u)}: only http and https URLs can be downloaded")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    targets = [dest / file_name(u, i, taken) for i, u in enumerate(urls)]
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (
        httpx.Client(follow_redirects=True, timeout=timeout) as client,
        Progress(
            *columns,
            disable=not show_progress,
            console=Console(stderr=True),  # stdout carries only results
        ) as progress,
    ):
        tasks = [progress.add_task(t.name, total=None) for t in targets]
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [
                pool.submit(download, client, u, t, max_bytes=max_bytes, retries=retries, progress=progress, task=k)
                for u, t, k in zip(urls, targets, tasks)
            ]
            return [f.result() for f in futures]


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def image_ref(s: str) -> Optional[str]:
    """The image reference in `image:REF` or a bare REF that can only be an image; else None."""
    if s.startswith("image:"):
        return s[len("image:") :]
    if not is_url(s) and not Path(s).exists() and _IMAGE_REF.match(s):
        return s
    return None


def pull_image(ref: str, dest: Path, auth_file: Optional[Path] = None) -> Path:
    """Pull a data image and place the files under its /data into dest."""
    try:
        from kaito.image_builder import pull
    except ImportError as e:
        raise KaitoError(f"pulling data image {ref}: the image builder is not available ({e})") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest))
    try:
        pull(ref, tmp, auth_file=auth_file)
        root = tmp / "data" if (tmp / "data").is_dir() else tmp
        for p in root.iterdir():
            if not p.name.startswith(".kaito"):  # the pull's own bookkeeping stays behind
                os.replace(p, dest / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_data(inputs: Sequence[str], work_dir: Path, **fetch_kwargs) -> Path:
    """Turn --data values into one local directory (downloading or pulling as needed)."""
    if not inputs:
        raise InvalidInput("--data is required: a directory, http(s) URLs, or image:REF")
    urls = [s for s in inputs if is_url(s)]
    if urls and len(urls) != len(inputs):
        raise InvalidInput("--data: give either URLs, or one directory, or one image, not a mix")
    if urls:
        fetch_urls(urls, work_dir, **fetch_kwargs)
        return Path(work_dir)
    if len(inputs) != 1:
        raise InvalidInput("--data: only URLs may be repeated; give one directory or one image")
    ref = image_ref(inputs[0])
    if ref:
        return pull_image(ref, work_dir)
    p = Path(inputs[0])
    if not p.is_dir():
        raise InvalidInput(f"--data {p}: no such directory (nor a URL or image:REF)")
    return p
