"""The one resumable HTTP downloader: a URL into a file that appears only when whole.

Called by `kaito.presets.hub` (model files at a pinned revision) and
`kaito.tuning.fetch` (training data URLs). Bytes go to `<dest>.part` as they
arrive, so a killed run resumes with a Range request; a server that ignores
Range (200) restarts the file, a 416 on a resumed part means the part is
already whole. Optional size limit, expected size and sha256; a progress
callback; transient failures (connection errors and the statuses in
`kaito.presets.retry`) are retried with that module's one policy. The end is an
fsync and an atomic rename. Messages name the file by `what` (default: the URL
without credentials or query), never a token.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx

from kaito.presets import retry
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.validate import redact

ProgressFn = Callable[[int, Optional[int]], None]  # (bytes on disk, total when known)
HASH_CHUNK = 1 << 20


class DownloadError(KaitoError):
    """A download that failed for good; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class DownloadRefused(DownloadError, InvalidInput):
    """The server refused the request (4xx): the URL or its access is the user's to fix."""


@dataclass
class _Job:
    url: str
    part: Path
    what: str
    client: httpx.Client
    headers: dict
    expected_size: Optional[int]
    sha256: Optional[str]
    max_bytes: Optional[int]
    progress: Optional[ProgressFn]
    hasher: Optional["hashlib._Hash"] = None
    hashed: int = 0  # bytes of the part already fed to `hasher`

    def too_big(self, n: int) -> InvalidInput:
        return InvalidInput(f"downloading {self.what}: {n} bytes exceeds the size limit {self.max_bytes} (--max-bytes)")


def _have(job: _Job) -> int:
    """Bytes of the part already on disk, dropping a part longer than the file can be."""
    have = job.part.stat().st_size if job.part.exists() else 0
    if job.expected_size is not None and have > job.expected_size:
        job.part.unlink()
        have = 0
    return have


def _hash_prefix(job: _Job, have: int) -> None:
    """Start the running sha256 with the bytes a resumed part already holds (read once, not per retry)."""
    if job.sha256 is None or (job.hasher is not None and job.hashed == have):
        return
    job.hasher, job.hashed = hashlib.sha256(), have
    if not have:
        return
    with open(job.part, "rb") as f:
        while have and (b := f.read(min(HASH_CHUNK, have))):
            job.hasher.update(b)
            have -= len(b)


def _check_status(job: _Job, r: httpx.Response) -> None:
    if r.status_code in (200, 206):
        return
    if retry.retryable_status(r.status_code):
        raise retry.TransientError(
            f"downloading {job.what}: HTTP {r.status_code}",
            status=r.status_code,
            retry_after=r.headers.get("retry-after"),
        )
    if 400 <= r.status_code < 500:
        raise DownloadRefused(
            f"downloading {job.what}: HTTP {r.status_code}; check the URL and its access", r.status_code
        )
    raise DownloadError(f"downloading {job.what}: HTTP {r.status_code} {r.reason_phrase}", r.status_code)


def _receive(job: _Job, r: httpx.Response, have: int) -> None:
    """Append the response body to the part, as it arrives, within the size limit."""
    length = r.headers.get("content-length")
    total = job.expected_size if job.expected_size is not None else (have + int(length) if length else None)
    if job.max_bytes is not None and total is not None and total > job.max_bytes:
        raise job.too_big(total)
    if job.progress:
        job.progress(have, total)
    with open(job.part, "ab" if have else "wb") as f:
        # Chunks as they arrive (not re-buffered): what was received is on disk when the
        # process is killed, so the next run's Range starts there.
        for chunk in r.iter_bytes():
            have += len(chunk)
            if job.max_bytes is not None and have > job.max_bytes:
                raise job.too_big(have)
            f.write(chunk)
            if job.hasher is not None:
                job.hasher.update(chunk)
                job.hashed = have
            if job.progress:
                job.progress(have, total)
        f.flush()
        os.fsync(f.fileno())
    if job.expected_size is not None and have < job.expected_size:
        raise retry.TransientError(f"downloading {job.what}: the server sent {have} of {job.expected_size} bytes")
    if job.expected_size is not None and have > job.expected_size:
        job.part.unlink()
        raise DownloadError(f"downloading {job.what}: the server sent {have} bytes, {job.expected_size} expected")


def _attempt(job: _Job) -> None:
    """One request: fetch whatever the part is missing. Transient failures raise `TransientError`."""
    have = _have(job)
    if job.expected_size is not None and have == job.expected_size:
        _hash_prefix(job, have)
        return
    headers = dict(job.headers)
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with job.client.stream("GET", job.url, headers=headers) as r:
            if r.status_code == 416 and have:  # nothing past the end: the part is already the whole file
                _hash_prefix(job, have)
                return
            _check_status(job, r)
            if r.status_code == 200:
                have = 0  # the server ignored Range: start over
            _hash_prefix(job, have)
            _receive(job, r, have)
    except httpx.TransportError as e:
        raise retry.TransientError(
            f"downloading {job.what}: {type(e).__name__}: {e}".replace(job.url, job.what)
        ) from None
    except httpx.HTTPError as e:  # a malformed URL or header: no retry cures it
        raise DownloadError(f"downloading {job.what}: {type(e).__name__}") from None


def _finish(job: _Job, dest: Path) -> None:
    if job.hasher is not None and job.hasher.hexdigest() != job.sha256:
        job.part.unlink(missing_ok=True)
        raise DownloadError(f"downloading {job.what}: sha256 mismatch, the file was discarded")
    os.replace(job.part, dest)


def download(
    url: str,
    dest: os.PathLike | str,
    *,
    client: Optional[httpx.Client] = None,
    headers: Optional[dict] = None,
    expected_size: Optional[int] = None,
    sha256: Optional[str] = None,
    max_bytes: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    policy: retry.Backoff = retry.DEFAULT,
    what: Optional[str] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists); resumes `dest.part` left by an earlier run.

    `expected_size`/`sha256` check the result (a mismatch discards it); `max_bytes`
    refuses a bigger file (InvalidInput). Raises `DownloadError` (HTTP status
    kept) or InvalidInput; messages say `downloading <what>: ...`.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    own = client is None
    http = httpx.Client(follow_redirects=True, timeout=60) if client is None else client
    job = _Job(
        url,
        dest.with_name(dest.name + ".part"),
        what or redact(url),
        http,
        dict(headers or {}),
        expected_size,
        sha256,
        max_bytes,
        progress,
    )
    try:
        retry.call(lambda: _attempt(job), policy=policy, sleep=sleep)
    except retry.TransientError as e:
        raise DownloadError(f"{e} (gave up after {policy.attempts - 1} retries)", e.status) from None
    except InvalidInput as e:
        if not isinstance(e, DownloadRefused):
            job.part.unlink(missing_ok=True)  # over the size limit: nothing worth resuming
        raise
    finally:
        if own:
            http.close()
    _finish(job, dest)
    return dest
