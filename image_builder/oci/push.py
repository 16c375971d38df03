"""Pushing images to a registry: HEAD-skip, cross-repo mount, resumable chunked streaming upload, manifest last.

Each blob streams from its source through a hasher into PATCH requests of
`chunk_size` bytes (memory stays at a few MiB whatever the file size); after
every accepted chunk the upload URL and offset go to a state file, so a
killed push resumes from the registry's reported offset; a chunk cut by a
dropped connection or a 5xx is retried with `kaito.presets.retry`'s policy,
each try resuming the same way. The bytes are hashed as they are sent and
checked against the layer's digest before the commit: a file is never pre-read
to verify it. Blobs go up in parallel (bounded); the manifest is PUT only when
every blob is present. No HTTP here: calls go through `remote.Registry`.
Called through kaito.image_builder.transfer (`Pusher`), which build, copy and the CLI use.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError, RegistryError, VerificationError
from kaito.image_builder.oci.image import Image
from kaito.image_builder.oci.layer import Layer, PipelinedSha256, _cache_dir
from kaito.image_builder.oci.progress import NULL, Progress
from kaito.image_builder.oci.remote import Registry
from kaito.presets import retry
from kaito.presets.fsio import atomic_write_json

# Resume granularity: a rerun asks the registry where the session stands (GET on the upload
# URL -> `Range: 0-N`, distribution spec) and sends from N+1, so a kill between chunks costs
# nothing and a registry that keeps a cut PATCH's bytes costs nothing either. Distribution
# (Docker's registry, Harbor) instead refuses every request on a session whose last PATCH was
# cut (404 BLOB_UPLOAD_INVALID: its signed state's offset no longer matches the stored bytes,
# registry/handlers/blobupload.go), and no request tells the stored size, so the blob restarts
# (tests/image_builder/test_push_midchunk.py). 64 MiB keeps the between-chunk loss small for multi-GB weight files while a
# PATCH per 64 MiB still streams at >= 0.9x a single raw PUT (bench/image_push.py).
DEFAULT_CHUNK = int(os.environ.get("KAITO_IMAGE_CHUNK_SIZE") or 64 << 20)


class _Interrupted(retry.TransientError):
    """A blob upload cut by a dropped connection or a retryable status; carries the error to report."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(str(error), status=error.status)
        self.error = error


@dataclass
class PushStats:
    """What a push did, per blob outcome; `bytes_uploaded` counts bytes actually sent."""

    bytes_uploaded: int = 0
    uploaded: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    mounted: list = field(default_factory=list)
    resumed: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, digest: str, nbytes: int = 0) -> None:
        with self._lock:
            getattr(self, kind).append(digest)
            self.bytes_uploaded += nbytes


class RateLimit:
    """Average-rate cap shared by all uploads of a push (`--limit-rate`)."""

    def __init__(self, bytes_per_s: Optional[float]) -> None:
        self.rate, self.sent, self.t0, self.lock = bytes_per_s, 0, time.monotonic(), threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.sent += n
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


class Pusher:
    """Pushes blobs and manifests to one repository."""

    def __init__(
        self,
        registry: Registry,
        repository: str,
        *,
        jobs: int = 4,
        chunk_size: int = DEFAULT_CHUNK,
        rate_limit: Optional[float] = None,
        progress: Progress = NULL,
        state_dir: Optional[Path] = None,
    ) -> None:
        self.registry, self.repo, self.jobs, self.chunk = registry, repository, max(1, jobs), max(1 << 16, chunk_size)
        self.limit, self.progress = RateLimit(rate_limit), progress
        self.state_dir = Path(state_dir) if state_dir else _cache_dir() / "uploads"
        self.stats = PushStats()

    # --- resumable state -------------------------------------------------------------------------
    def _state_path(self, digest: str) -> Path:
        key = hashlib.sha256(f"{self.registry.host}/{self.repo}@{digest}".encode()).hexdigest()[:32]
        return self.state_dir / f"{key}.json"

    def _save(self, digest: str, location: str, offset: int) -> None:
        p = self._state_path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        # No fsync: losing the state costs a re-send, while a sync per 64 MiB chunk costs every push.
        atomic_write_json(p, {"location": location, "offset": offset, "digest": digest}, fsync=False)

    def _forget(self, digest: str) -> None:
        self._state_path(digest).unlink(missing_ok=True)

    def _load(self, digest: str) -> Optional[dict]:
        try:
            return json.loads(self._state_path(digest).read_text())
        except (OSError, ValueError):
            return None

    # --- blobs -----------------------------------------------------------------------------------
    def push_blob(self, layer: Layer) -> str:
        """Make `layer`'s blob present in the repository; returns skipped, mounted, resumed or uploaded."""
        name = layer.annotations.get("org.cncf.model.filepath") or layer.digest[7:19]
        if self.registry.head_blob(self.repo, layer.digest) is not None:
            self._forget(layer.digest)  # killed after the commit: nothing to resume
            self.stats.add("skipped", layer.digest)
            self.progress.finish(layer.digest, "exists")
            return "skipped"
        mount = getattr(layer.source, "mount_from", None) if layer.source else None
        location = None
        if mount and mount[0] == self.registry.host and mount[1] != self.repo:
            location = self.registry.mount_blob(self.repo, layer.digest, mount[1])
            if location is None:
                self.stats.add("mounted", layer.digest)
                self.progress.finish(layer.digest, f"mounted from {mount[1]}")
                return "mounted"
        advance = self.progress.task(layer.digest, f"push {name}", layer.size)
        outcome = self._upload(layer, location, advance)
        self.progress.finish(layer.digest, outcome)
        return outcome

    def _upload(self, layer: Layer, location: Optional[str], advance) -> str:
        """Upload with the project's retry policy; each retry resumes from where the registry stands."""
        first = [location]  # a session the refused mount opened: used by the first attempt only

        def attempt() -> str:
            return self._attempt(layer, first.pop() if first else None, advance)

        try:
            return retry.call(attempt, policy=self.registry.policy, transient=(_Interrupted,))
        except _Interrupted as e:
            raise e.error from None

    def _session(self, layer: Layer, location: Optional[str]) -> tuple[str, int, str]:
        """(upload URL, offset, outcome): the saved session where the registry still holds it, else a new one."""
        if location is None:
            st = self._load(layer.digest)
            got = self.registry.upload_offset(self.repo, st["location"]) if st else None
            if got is not None and got[1] <= layer.size:
                return got[0], got[1], "resumed" if got[1] else "uploaded"
            location = self.registry.start_upload(self.repo)
        return location, 0, "uploaded"

    def _attempt(self, layer: Layer, location: Optional[str], advance) -> str:
        location, offset, outcome = self._session(layer, location)
        try:
            self._send(layer, location, offset, advance)
        except VerificationError:
            self._forget(layer.digest)
            self.registry.cancel_upload(self.repo, location)
            raise
        except RegistryError as e:
            if outcome == "resumed" and e.status in (400, 404, 416):
                # The session we resumed was refused after all (distribution settles a killed
                # PATCH late, then drops the session): start this blob afresh, once.
                self._forget(layer.digest)
                return self._attempt(layer, None, advance)
            if e.status is None or retry.retryable_status(e.status):
                raise _Interrupted(e) from None  # connection lost or 5xx mid-chunk: the next try resumes
            raise
        self._forget(layer.digest)
        self.stats.add(outcome, layer.digest)
        return outcome

    def _send(self, layer: Layer, location: str, offset: int, advance) -> None:
        h = V.new_hash(layer.digest)
        if offset:
            left = offset
            for b in layer.open(0):  # the registry has these bytes; we still need them in our digest
                b = b[:left]
                h.update(b)
                left -= len(b)
                if not left:
                    break
            advance(offset)
        while offset < layer.size:  # an empty blob needs no PATCH, only the final PUT
            n = min(self.chunk, layer.size - offset)
            sent: dict[str, PipelinedSha256] = {}

            def body(start=offset, n=n, base=h, sent=sent) -> Iterator[bytes]:
                # Each attempt hashes from the same starting state; hashing overlaps the send.
                hh, left = PipelinedSha256(base.copy()), n
                sent["h"] = hh
                for b in layer.open(start, chunk=1 << 20):
                    b = b[:left]
                    hh.update(b)
                    left -= len(b)
                    advance(len(b))
                    yield b
                    if not left:
                        break
                if left:
                    raise OCIError(f"reading layer {layer.digest}: source ended {left} bytes early")

            try:
                location = self.registry.patch(self.repo, location, offset, n, body)
            finally:
                if "h" in sent:
                    sent["h"].close()
            h = sent["h"].sync()
            offset += n
            with self.stats._lock:
                self.stats.bytes_uploaded += n
            self._save(layer.digest, location, offset)
            # Throttle between chunks, not inside one: an interrupted PATCH makes distribution drop the session.
            self.limit.take(n)
        digest = f"{h.name}:{h.hexdigest()}"
        if digest != layer.digest:
            raise VerificationError(
                f"uploading layer {layer.digest}: its source now hashes to {digest} (changed since the build); rebuild"
            )
        self.registry.finish_upload(self.repo, location, layer.digest)

    # --- images ----------------------------------------------------------------------------------
    def push_image(self, image: Image, tag: Optional[str]) -> str:
        """Push every blob (parallel, bounded), then the manifest; returns the manifest digest."""
        blobs = {b.digest: b for b in image.blobs()}
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="kaito-push") as ex:
            futures = [ex.submit(self.push_blob, b) for b in blobs.values()]
            errors = []
            for f in futures:
                try:
                    f.result()
                except BaseException as e:  # collect, so nothing is reported as pushed
                    errors.append(e)
            if errors:
                raise errors[0]
        return self.registry.put_manifest(self.repo, tag or image.digest, image.manifest_bytes, image.media_type)
