"""OCI image layout directories as a source and a sink (readable by skopeo's `oci:` transport).

Blobs are written beside their final name and renamed into place only after
their digest is verified, so a killed write leaves nothing half-valid;
index.json (rewritten whole through `kaito.presets.fsio`) updates hold a lock.
Blobs keep their own temporary name because their final name is their digest,
known only once written. Writing a blob hashes and writes in parallel
(hashlib and file writes both release the GIL). Called by build and transfer (which pull, inspect, copy and the CLI go through).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError, VerificationError
from kaito.image_builder.oci.image import Image
from kaito.image_builder.oci.layer import (
    BlobSource,
    FileRange,
    Layer,
    ProgressFn,
    Segment,
    hash_file_range,
    stream_segments,
)
from kaito.presets.fsio import atomic_write_bytes, atomic_write_json

_seq = itertools.count()
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


class Layout(BlobSource):
    """One OCI layout directory."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Layout({str(self.path)!r})"

    # --- blobs ------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        V.check_digest(digest, f"reading layout {self.path}")  # never a path from an unchecked string
        algo, _, hex_ = digest.partition(":")
        return self.path / "blobs" / algo / hex_

    def has_blob(self, digest: str, size: Optional[int] = None) -> bool:
        p = self.blob_path(digest)
        try:
            return p.is_file() and (size is None or p.stat().st_size == size)
        except OSError:
            return False

    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:
        p = self.blob_path(digest)
        if not p.is_file():
            raise OCIError(f"reading blob {digest} from layout {self.path}: it is missing")
        return stream_segments((FileRange(p, 0, p.stat().st_size),), offset)

    def read_blob(self, digest: str) -> bytes:
        p = self.blob_path(digest)
        try:
            return V.verify_bytes(p.read_bytes(), digest, f"blob {digest} in {self.path}")
        except FileNotFoundError:
            raise OCIError(f"reading blob {digest} from layout {self.path}: it is missing") from None

    def _init(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if not marker.exists():
            atomic_write_bytes(marker, LAYOUT_VERSION)
        if not (self.path / "index.json").exists():
            self._write_index({"schemaVersion": 2, "mediaType": V.OCI_INDEX, "manifests": []})

    def _tmp_blob(self) -> Path:
        # Unique per process, thread and call: concurrent builds into one layout never share a file.
        return self.path / "blobs" / f".ingest-{os.getpid()}-{threading.get_ident():x}-{next(_seq)}"

    def _commit_blob(self, tmp: Path, digest: str) -> str:
        """Rename a complete, verified temporary file into its content-addressed place."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return digest

    def digester(self, segments: tuple[Segment, ...], progress: ProgressFn = None) -> str:
        """Layer.from_segments hook: building into a layout copies and hashes in one pass.

        File ranges are copied in the kernel (copy_file_range) on a helper thread while this
        thread hashes the same range through mmap, so a build costs about one sha256.
        """
        self._init()
        tmp = self._tmp_blob()
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f, ThreadPoolExecutor(1) as copier:

                def copy_all() -> None:
                    for s in segments:
                        if isinstance(s, bytes):
                            f.write(s)
                            continue
                        f.flush()
                        with open(s.path, "rb") as src:
                            off, left = s.offset, s.length
                            while left:
                                try:
                                    n = os.copy_file_range(src.fileno(), f.fileno(), left, off)
                                except OSError:  # e.g. across filesystems on old kernels
                                    src.seek(off)
                                    b = src.read(min(left, 8 << 20))
                                    f.write(b)
                                    f.flush()
                                    n = len(b)
                                if n == 0:
                                    raise OCIError(f"reading {s.path}: file shrank while building the layer")
                                off, left = off + n, left - n

                copied = copier.submit(copy_all)
                for s in segments:
                    if isinstance(s, bytes):
                        h.update(s)
                    else:
                        hash_file_range(h, s)
                    if progress:
                        progress(len(s) if isinstance(s, bytes) else s.length)
                copied.result()
            digest = "sha256:" + h.hexdigest()
            return self._commit_blob(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)

    def ingest(self, chunks: Iterable[bytes], progress: ProgressFn = None, expect: Optional[str] = None) -> str:
        """Write `chunks` as a blob, hashing while writing; renamed into place only when verified."""
        self._init()
        tmp = self._tmp_blob()
        h = V.new_hash(expect) if expect else hashlib.sha256()
        try:
            with open(tmp, "wb") as f, ThreadPoolExecutor(1) as writer:
                pending = None
                for chunk in chunks:
                    nxt = writer.submit(f.write, chunk)
                    h.update(chunk)  # overlaps with the write above
                    if pending is not None:
                        pending.result()
                    pending = nxt
                    if progress:
                        progress(len(chunk))
                if pending is not None:
                    pending.result()
            digest = f"{h.name}:{h.hexdigest()}"
            if expect and digest != expect:
                raise VerificationError(f"writing blob to {self.path}: content has digest {digest}, expected {expect}")
            return self._commit_blob(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)

    def write_layer(self, layer: Layer, progress: ProgressFn = None) -> int:
        """Store `layer`'s blob unless present; returns bytes written."""
        if self.has_blob(layer.digest, layer.size):
            return 0
        self.ingest(layer.open(), progress, expect=layer.digest)
        return layer.size

    # --- index ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        self._init()
        with open(self.path / ".index.lock", "a+") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            yield

    def read_index(self) -> dict:
        try:
            index = json.loads((self.path / "index.json").read_bytes())
        except FileNotFoundError:
            raise OCIError(
                f"reading layout {self.path}: no index.json (not an OCI layout; build or copy an image there first)"
            ) from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise OCIError(f"reading layout {self.path}: index.json is not JSON ({e})") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise OCIError(f"reading layout {self.path}: index.json is not an OCI index (no 'manifests' list)")
        return index

    def _write_index(self, index: dict) -> None:
        atomic_write_json(self.path / "index.json", index, indent=2, sort_keys=True)

    def tags(self) -> list[str]:
        return [
            m.get("annotations", {}).get(V.ANN_REF_NAME)
            for m in self.read_index().get("manifests", [])
            if m.get("annotations", {}).get(V.ANN_REF_NAME)
        ]

    def resolve(self, target: Optional[str]) -> V.Descriptor:
        manifests = [V.Descriptor.from_json(m) for m in self.read_index().get("manifests", [])]
        if target and V.is_digest(target):
            for m in manifests:
                if m.digest == target:
                    return m
            if self.has_blob(target):
                return V.Descriptor(V.OCI_MANIFEST, target, self.blob_path(target).stat().st_size)
        else:
            tagged = [m for m in manifests if m.annotations.get(V.ANN_REF_NAME) == (target or "latest")]
            if not target and not tagged and len(manifests) == 1:
                tagged = manifests
            if tagged:
                return tagged[-1]
        raise OCIError(
            f"resolving {target or 'latest'} in layout {self.path}: not found (tags: {', '.join(self.tags()) or 'none'})"
        )

    def read_image(self, target: Optional[str]) -> Image:
        desc = self.resolve(target)
        raw = self.read_blob(desc.digest)
        m = V.parse_manifest(raw, desc.media_type)
        if isinstance(m, V.Index):
            desc = V.pick_platform(m)
            raw = self.read_blob(desc.digest)
            m = V.parse_manifest(raw, desc.media_type)
            if isinstance(m, V.Index):
                raise OCIError(
                    f"reading oci:{self.path}:{target or 'latest'}: the index entry {desc.digest} is itself "
                    "an index; name an image manifest"
                )
        return image_from_manifest(m, self.read_blob(m.config.digest), self)

    def write_image(self, image: Image, tag: Optional[str], progress_for=None) -> int:
        """Store every blob, then the manifest, then point `tag` at it. Returns bytes written."""
        self._init()
        written = 0
        for blob in image.blobs():
            if self.has_blob(blob.digest, blob.size):
                continue
            written += self.write_layer(blob, progress_for(blob) if progress_for else None)
        raw = image.manifest_bytes
        if not self.has_blob(image.digest):
            self.ingest([raw], expect=image.digest)
            written += len(raw)
        desc = {"mediaType": image.media_type, "digest": image.digest, "size": len(raw)}
        if image.artifact_type:
            desc["artifactType"] = image.artifact_type
        if tag:
            desc["annotations"] = {V.ANN_REF_NAME: tag}
        with self._locked():
            index = self.read_index()
            keep = [
                m
                for m in index.get("manifests", [])
                if not (tag and m.get("annotations", {}).get(V.ANN_REF_NAME) == tag)
                and not (not tag and m.get("digest") == image.digest)
            ]
            index["manifests"] = keep + [desc]
            self._write_index(index)
        return written


def image_from_manifest(m: V.Manifest, config: bytes, source: BlobSource) -> Image:
    """An Image whose layers stream from `source` (digests as the manifest says; checked when read)."""
    V.verify_bytes(config, m.config.digest, "image config")
    cfg_diff: list[str] = []
    try:
        cfg_diff = (json.loads(config).get("rootfs") or {}).get("diff_ids") or []
    except (ValueError, AttributeError):
        pass
    layers = []
    for i, d in enumerate(m.layers):
        diff = cfg_diff[i] if i < len(cfg_diff) else d.digest
        layers.append(Layer(d.media_type, d.digest, d.size, diff, dict(d.annotations), None, source))
    return Image(
        config_bytes=config,
        layers=tuple(layers),
        annotations=dict(m.annotations),
        config_media_type=m.config.media_type,
        artifact_type=m.artifact_type,
        media_type=m.media_type,
        raw_manifest=m.raw,
        source=source,
    )
