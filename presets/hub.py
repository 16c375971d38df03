"""Resumable Hugging Face hub downloads at a pinned revision.

Called by `kaito.presets.weights.from_hub`. huggingface_hub lists the
repository tree (file names, sizes, LFS sha256); the bytes are fetched here
with httpx into `<cache>/<org>--<name>/<revision>/<file>.part`, so a download
killed half way resumes with a Range request on the next run, and a file
already complete is skipped. Each LFS file is checked against its sha256
before it is renamed into place. The token goes only into the Authorization
header, never into messages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import httpx

from kaito.presets.contract import ENV_HF_TOKEN, ENV_HUB_CACHE
from kaito.presets.errors import InvalidInput, KaitoError

COMPLETE = ".kaito-complete.json"
CHUNK = 1 << 20
ATTEMPTS = 5


def default_cache() -> Path:
    base = os.environ.get(ENV_HUB_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kaito", "hub"
    )
    return Path(base)


def _listing(repo: str, revision: str, endpoint: Optional[str], token: Optional[str], patterns: list[str]):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    files = [f for f in api.list_repo_tree(repo, revision=revision, recursive=True) if isinstance(f, RepoFile)]
    return [f for f in files if any(fnmatch.fnmatch(f.path.rsplit("/", 1)[-1], p) for p in patterns)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def _fetch(url: str, part: Path, size: int, headers: dict, bar, task) -> None:
    """Append the missing tail of `url` to `part`, retrying transport errors with backoff."""
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            return
        h = dict(headers)
        if have:
            h["Range"] = f"bytes={have}-"
        try:
            with httpx.stream("GET", url, headers=h, follow_redirects=True, timeout=60) as r:
                if r.status_code == 200 and have:  # the server ignored Range: start over
                    part.unlink()
                    have = 0
                elif r.status_code not in (200, 206):
                    raise KaitoError(f"HTTP {r.status_code} {r.reason_phrase}")
                if bar is not None:
                    bar.update(task, completed=have)
                with open(part, "ab") as f:
                    # Chunks as they arrive (not re-buffered to CHUNK): what was received is on disk
                    # when the process is killed, so the next run's Range starts there.
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                        if bar is not None:
                            bar.advance(task, len(chunk))
        except httpx.TransportError:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(min(2**attempt * 0.2, 5))
    if part.stat().st_size != size:
        raise KaitoError(f"got {part.stat().st_size} of {size} bytes after {ATTEMPTS} attempts")


def download(
    repo: str,
    revision: str,
    patterns: list[str],
    *,
    cache_dir: Optional[Path] = None,
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """Return a directory holding `repo` at `revision` (files matching `patterns`), downloading what is missing."""
    from huggingface_hub import hf_hub_url

    root = Path(cache_dir or default_cache()) / repo.replace("/", "--") / revision
    marker = root / COMPLETE
    if marker.is_file():
        return root
    from huggingface_hub import constants

    if local_files_only or constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1 means no network, as for hf itself
        raise InvalidInput(f"{repo}@{revision[:12]} is not in the cache at {root} and downloads are off (offline)")
    token = token or os.environ.get(ENV_HF_TOKEN) or None
    files = _listing(repo, revision, endpoint, token, patterns)
    if not files:
        raise KaitoError(f"{repo}@{revision[:12]} has no file matching {', '.join(patterns)}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        # Progress is not a result: stderr, so a command's stdout stays parseable.
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True),
        )
        bar.start()
    try:
        for f in files:
            dest = root / f.path
            size = f.lfs.size if f.lfs else f.size
            if dest.is_file() and dest.stat().st_size == size:
                continue  # finished by an earlier run
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            task = bar.add_task(f.path, total=size) if bar else None
            url = hf_hub_url(repo, f.path, revision=revision, endpoint=endpoint)
            try:
                _fetch(url, part, size, headers, bar, task)
            except (KaitoError, httpx.HTTPError) as e:
                raise KaitoError(f"downloading {f.path} of {repo}@{revision[:12]}: {e}") from None
            if f.lfs and _sha256(part) != f.lfs.sha256:
                part.unlink()
                raise KaitoError(
                    f"downloading {f.path} of {repo}@{revision[:12]}: sha256 mismatch, the file was discarded"
                )
            os.replace(part, dest)
    finally:
        if bar is not None:
            bar.stop()
    marker.write_text(json.dumps(sorted(f.path for f in files)))
    return root
