"""Resumable Hugging Face hub downloads at a pinned revision.

Called by `kaito.presets.weights.from_hub`. huggingface_hub lists the
repository tree (file names, sizes, LFS sha256); the bytes are fetched here
by `kaito.presets.download` (the project's one resumable downloader) into
`<cache>/<org>--<name>/<revision>/<file>.part`, so a download killed half way
resumes with a Range request on the next run, and a file already complete is
skipped. Each LFS file is checked against its sha256 before it is renamed into
place. The token goes only into the Authorization header, never into messages.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Optional

import httpx

from kaito.presets import download as dl
from kaito.presets.contract import ENV_HF_TOKEN, ENV_HUB_CACHE
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.fsio import atomic_write_json

COMPLETE = ".kaito-complete.json"


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


def _fetch_file(client, repo: str, revision: str, endpoint, root: Path, f, headers: dict, bar) -> None:
    """One listed file into the cache, resumed from its `.part`; LFS files checked against their sha256."""
    from huggingface_hub import hf_hub_url

    dest = root / f.path
    size = f.lfs.size if f.lfs else f.size
    if dest.is_file() and dest.stat().st_size == size:
        return  # finished by an earlier run
    dest.unlink(missing_ok=True)  # a file of the wrong size is not this revision's
    dest.parent.mkdir(parents=True, exist_ok=True)
    task = bar.add_task(f.path, total=size) if bar else None
    dl.download(
        hf_hub_url(repo, f.path, revision=revision, endpoint=endpoint),
        dest,
        client=client,
        headers=headers,
        expected_size=size,
        sha256=f.lfs.sha256 if f.lfs else None,
        progress=(lambda done, total: bar.update(task, completed=done)) if bar else None,
        what=f"{f.path} of {repo}@{revision[:12]}",
    )


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
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        )
        bar.start()
    try:
        with httpx.Client(follow_redirects=True, timeout=60) as client:
            for f in files:
                _fetch_file(client, repo, revision, endpoint, root, f, headers, bar)
    finally:
        if bar is not None:
            bar.stop()
    atomic_write_json(marker, sorted(f.path for f in files))
    return root
