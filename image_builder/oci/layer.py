"""Immutable `Layer` values: reproducible tar layers from files, directories or bytes, and blobs from elsewhere.

A layer's blob is described, never held: a list of segments (literal bytes,
or a byte range of a local file) that can be streamed from any offset, which
is what resumable uploads and bounded memory need. Tars are reproducible:
sorted entries, mtime 0, uid/gid 0, no user names, modes 0644/0755, PAX
headers only when a name or size needs them. A layer's digest is computed
once: `DigestCache` remembers it by the source files' identity (path, inode,
size, mtime) in memory and on disk, and `hash_variants` hashes several tars of
the same file in one read. Built by kaito.image_builder's build code; read by
layout (sink) and push (which hashes the bytes it sends instead of re-reading).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import InvalidInput, OCIError
from kaito.presets.fsio import atomic_write_text

CHUNK = 1 << 20  # streaming granularity: big enough for throughput, small for memory
ProgressFn = Optional[Callable[[int], None]]


@dataclass(frozen=True)
class FileRange:
    path: Path
    offset: int
    length: int


Segment = Union[bytes, FileRange]


class BlobSource:
    """Something that can stream a blob it holds (a layout or a registry repository)."""

    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:  # pragma: no cover
        raise NotImplementedError

    # (registry, repository) when the blob can be cross-repo mounted from it
    mount_from: Optional[tuple[str, str]] = None


@dataclass(frozen=True)
class TarEntry:
    """One tar member: a file (from disk or bytes), a directory or a symlink."""

    path: str
    kind: str = "file"  # file | dir | symlink
    source: Optional[Path] = None
    data: Optional[bytes] = None
    mode: Optional[int] = None
    linkname: str = ""

    def size(self) -> int:
        if self.kind != "file":
            return 0
        return len(self.data) if self.data is not None else self.file().stat().st_size

    def file(self) -> Path:
        """The file a file entry without `data` is read from."""
        if self.source is None:
            raise InvalidInput(f"tar entry {self.path}: a file entry needs `source` (a path) or `data` (bytes)")
        return self.source


def _header(e: TarEntry, size: int) -> bytes:
    ti = tarfile.TarInfo(e.path.strip("/") + ("/" if e.kind == "dir" else ""))
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    if e.kind == "dir":
        ti.type, ti.mode = tarfile.DIRTYPE, e.mode or 0o755
    elif e.kind == "symlink":
        ti.type, ti.mode, ti.linkname = tarfile.SYMTYPE, 0o777, e.linkname
    else:
        ti.type, ti.size = tarfile.REGTYPE, size
        ti.mode = e.mode if e.mode is not None else 0o644
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_segments(entries: Iterable[TarEntry]) -> tuple[Segment, ...]:
    """Segments of an uncompressed tar of `entries` (caller sorts), ending with two zero blocks."""
    segs: list[Segment] = []
    pending = b""
    for e in entries:
        size = e.size()
        pending += _header(e, size)
        if e.kind == "file" and size:
            if e.data is not None:
                pending += e.data
            else:
                segs.append(pending)
                pending = b""
                segs.append(FileRange(e.file(), 0, size))
            pad = -size % 512
            pending += b"\0" * pad
    segs.append(pending + b"\0" * 1024)
    return tuple(s for s in segs if not isinstance(s, bytes) or s)


def parent_dirs(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def stream_segments(segments: Iterable[Segment], offset: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the bytes of `segments` from `offset`, at most `chunk` bytes at a time."""
    pos = 0
    for s in segments:
        n = len(s) if isinstance(s, bytes) else s.length
        if pos + n <= offset:
            pos += n
            continue
        skip = max(0, offset - pos)
        pos += n
        if isinstance(s, bytes):
            for i in range(skip, n, chunk):
                yield s[i : i + chunk]
            continue
        left = n - skip
        with open(s.path, "rb") as f:
            f.seek(s.offset + skip)
            while left:
                b = f.read(min(chunk, left))
                if not b:
                    raise OCIError(f"reading {s.path}: file shrank while building the layer; rebuild the image")
                left -= len(b)
                yield b


class PipelinedSha256:
    """sha256 fed on a helper thread so hashing overlaps the caller's I/O (hashlib releases the GIL).

    Order is kept (one worker); at most two chunks are in flight, so memory stays bounded.
    """

    def __init__(self, h=None) -> None:
        self.h = h if h is not None else hashlib.sha256()
        self.ex = ThreadPoolExecutor(1, thread_name_prefix="kaito-hash")
        self.pending: Optional[Future[None]] = None

    def update(self, b) -> None:
        fut = self.ex.submit(self.h.update, b)
        if self.pending is not None:
            self.pending.result()
        self.pending = fut

    def sync(self):
        """Wait for queued chunks; returns the underlying hashlib object."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        return self.h

    def hexdigest(self) -> str:
        return self.sync().hexdigest()

    def close(self) -> None:
        self.ex.shutdown(wait=True)


def hash_file_range(h, r: "FileRange") -> None:
    """Feed a file range to `h` through one reused buffer (no mmap: mapped pages would count as our RSS)."""
    buf = bytearray(min(r.length, 4 << 20) or 1)
    view = memoryview(buf)
    with open(r.path, "rb", buffering=0) as f:
        f.seek(r.offset)
        left = r.length
        while left:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise OCIError(f"reading {r.path}: file shrank while building the layer; rebuild the image")
            h.update(view[:n])
            left -= n


def _cache_dir() -> Path:
    return Path(os.environ.get("KAITO_CACHE_DIR") or Path.home() / ".cache" / "kaito")


def _cache_key(segments: tuple[Segment, ...], media_type: str) -> Optional[str]:
    """A key that changes when any source file changes (path, inode, size, mtime), like make and git do."""
    parts: list = [media_type]
    for s in segments:
        if isinstance(s, bytes):
            parts.append(hashlib.sha256(s).hexdigest())
        else:
            st = s.path.stat()
            parts.append([str(s.path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, s.offset, s.length])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class DigestCache:
    """Layer digests keyed by their sources' identity: a file is hashed once per content, not once per use.

    Two levels: this process's memory (one build describing the same layer twice, or with
    the disk cache unwritable) and `<cache>/layer-digests/<key>` on disk (rebuilds).
    """

    _memory: dict[str, str] = {}
    _lock = threading.Lock()

    @staticmethod
    def key(segments: tuple[Segment, ...], media_type: str) -> Optional[str]:
        """Only layers with file content are worth remembering; in-memory bytes hash in no time."""
        return _cache_key(segments, media_type) if any(isinstance(s, FileRange) for s in segments) else None

    @classmethod
    def get(cls, key: str) -> Optional[str]:
        with cls._lock:
            if key in cls._memory:
                return cls._memory[key]
        try:
            cached = (_cache_dir() / "layer-digests" / key).read_text().strip()
        except OSError:
            return None
        return cached if V.is_digest(cached) else None

    @classmethod
    def put(cls, key: str, digest: str) -> None:
        with cls._lock:
            cls._memory[key] = digest
        path = _cache_dir() / "layer-digests" / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, digest, fsync=False)  # a lost entry costs one re-hash
        except OSError:
            pass  # the cache only saves time


def hash_segments(segments: tuple[Segment, ...], progress: ProgressFn = None) -> str:
    return hash_variants([segments], progress)[0]


def _file_ranges(segments: tuple[Segment, ...]) -> list[FileRange]:
    return [s for s in segments if isinstance(s, FileRange)]


def hash_variants(variants: list[tuple[Segment, ...]], progress: ProgressFn = None) -> list[str]:
    """Digests of several blobs that hold the same file ranges in the same order, each file read once.

    The same weight file wrapped in two tars (the image's `workspace/weights/x` and the
    ModelPack's `x`) differs only in the literal header bytes around it, so one read of the
    file feeds every blob's hasher. Progress counts the first variant's bytes.
    """
    ranges = _file_ranges(variants[0])
    if any(_file_ranges(v) != ranges for v in variants[1:]):
        raise ValueError("hash_variants: the variants must share their file ranges, in order")
    hashers = [hashlib.sha256() for _ in variants]
    cursors = [0] * len(variants)
    for r in ranges + [None]:
        for i, v in enumerate(variants):  # literal bytes up to the next shared file range
            while cursors[i] < len(v):
                seg = v[cursors[i]]
                if not isinstance(seg, bytes):
                    break
                hashers[i].update(seg)
                if progress and i == 0:
                    progress(len(seg))
                cursors[i] += 1
            cursors[i] += 1  # past the file range itself
        if r is not None:
            hash_file_range(_Fanout(hashers), r)
            if progress:
                progress(r.length)
    return ["sha256:" + h.hexdigest() for h in hashers]


class _Fanout:
    """Looks like one hasher; feeds several."""

    def __init__(self, hashers: list) -> None:
        self.hashers = hashers

    def update(self, b) -> None:
        for h in self.hashers:
            h.update(b)


def _size(segments: tuple[Segment, ...]) -> int:
    return sum(len(s) if isinstance(s, bytes) else s.length for s in segments)


def _file_tar(path: Path, arcname: str, mode: Optional[int], with_parents: bool) -> tuple[Segment, ...]:
    """The segments of a one-file tar at `arcname` (its parents added as 0755 dirs)."""
    entries = [TarEntry(d, "dir") for d in parent_dirs(arcname)] if with_parents else []
    entries.append(TarEntry(arcname.strip("/"), "file", source=path.resolve(), mode=mode))
    return tar_segments(entries)


@dataclass(frozen=True)
class Layer:
    """A layer (or any blob an image references): descriptor fields plus where its bytes come from."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    segments: Optional[tuple[Segment, ...]] = None
    source: Optional[BlobSource] = None

    @property
    def descriptor(self) -> V.Descriptor:
        return V.Descriptor(self.media_type, self.digest, self.size, dict(self.annotations))

    def open(self, offset: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
        """Stream the blob from `offset`."""
        if self.segments is not None:
            return stream_segments(self.segments, offset, chunk)
        if self.source is not None:
            return self.source.open_blob(self.digest, self.size, offset)
        raise OCIError(f"reading layer {self.digest}: its content is not available here")

    def read_bytes(self) -> bytes:
        return b"".join(self.open())

    def with_media_type(self, media_type: str, annotations: Optional[Mapping[str, str]] = None) -> "Layer":
        """The same blob seen with another media type (e.g. a ModelPack weight layer): stored once."""
        return replace(
            self, media_type=media_type, annotations=dict(annotations if annotations is not None else self.annotations)
        )

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_segments(
        cls,
        segments: tuple[Segment, ...],
        media_type: str = V.OCI_LAYER,
        annotations: Optional[Mapping] = None,
        progress: ProgressFn = None,
        cache: bool = True,
        digester: Optional[Callable[[tuple[Segment, ...], ProgressFn], str]] = None,
        have: Optional[Callable[[str], bool]] = None,
    ) -> "Layer":
        """Describe `segments`, hashing them once (or reusing the cached digest when the sources are unchanged).

        `digester` replaces the plain hash pass (a layout sink writes its blob while hashing);
        `have(digest)` says whether a cached digest's blob is already where it is needed.
        """
        size = _size(segments)
        if progress is not None and hasattr(progress, "resize"):
            progress.resize(size)  # the bar was opened with the file's size; the tar stream is a little longer
        key = DigestCache.key(segments, media_type) if cache else None
        digest = DigestCache.get(key) if key else None
        if digest is not None and (have is None or have(digest)):
            if progress:
                progress(size)
        else:
            digest = (digester or hash_segments)(segments, progress)
            if key:
                DigestCache.put(key, digest)
        return cls(media_type, digest, size, digest, dict(annotations or {}), segments)

    @classmethod
    def from_file_variants(
        cls,
        path: Union[str, Path],
        variants: list[tuple[str, Optional[Mapping]]],
        *,
        progress: ProgressFn = None,
        cache: bool = True,
    ) -> list["Layer"]:
        """One file as several tar layers, one per (arcname, annotations), the file read once for all.

        For a build that writes the same weights into two images (the preset image and its
        ModelPack artifact): without this each would hash the file separately.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"layer source {path} is not a file")
        segs = [_file_tar(path, arc, None, True) for arc, _ in variants]
        keys = [DigestCache.key(sg, V.OCI_LAYER) if cache else None for sg in segs]
        cached = [DigestCache.get(k) if k else None for k in keys]
        todo = [i for i, d in enumerate(cached) if d is None]
        if progress is not None and hasattr(progress, "resize"):
            progress.resize(_size(segs[0]))
        fresh = dict(zip(todo, hash_variants([segs[i] for i in todo], progress))) if todo else {}
        for i, d in fresh.items():
            key = keys[i]
            if key:
                DigestCache.put(key, d)
        if not todo and progress:
            progress(_size(segs[0]))
        digests = [fresh[i] if d is None else d for i, d in enumerate(cached)]
        return [
            cls(V.OCI_LAYER, d, _size(sg), d, dict(ann or {}), sg) for (_, ann), sg, d in zip(variants, segs, digests)
        ]

    @classmethod
    def from_file(
        cls,
        path: Union[str, Path],
        arcname: str,
        *,
        mode: Optional[int] = None,
        annotations: Optional[Mapping] = None,
        progress: ProgressFn = None,
        with_parents: bool = True,
        **kw,
    ) -> "Layer":
        """One file as an uncompressed tar layer at `arcname` (parents added as 0755 dirs)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"layer source {path} is not a file")
        return cls.from_segments(_file_tar(path, arcname, mode, with_parents), V.OCI_LAYER, annotations, progress, **kw)

    @classmethod
    def from_entries(
        cls,
        entries: Iterable[TarEntry],
        *,
        compression: Optional[str] = None,
        annotations: Optional[Mapping] = None,
        progress: ProgressFn = None,
        **kw,
    ) -> "Layer":
        """A tar of explicit entries (sorted by path here); gzip/zstd compression for small code layers."""
        entries = sorted(entries, key=lambda e: e.path.strip("/"))
        segs = tar_segments(entries)
        if compression is None:
            return cls.from_segments(segs, V.OCI_LAYER, annotations, progress, **kw)
        raw = b"".join(stream_segments(segs))
        diff_id = V.sha256_digest(raw)
        if compression == "gzip":
            buf = io.BytesIO()
            with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
                gz.write(raw)
            blob, mt = buf.getvalue(), V.OCI_LAYER_GZIP
        elif compression == "zstd":
            import zstandard

            blob, mt = zstandard.ZstdCompressor(level=10).compress(raw), V.OCI_LAYER_ZSTD
        else:
            raise InvalidInput(f"compression {compression!r} is not one of gzip, zstd (or none)")
        return cls(mt, V.sha256_digest(blob), len(blob), diff_id, dict(annotations or {}), (blob,))

    @classmethod
    def from_dir(
        cls, directory: Union[str, Path], prefix: str, *, files: Optional[Iterable[str]] = None, **kw
    ) -> "Layer":
        """Files of `directory` (recursively, symlinks followed; or just `files`) under `prefix` in the tar."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InvalidInput(f"layer source {directory} is not a directory")
        names = (
            sorted(files)
            if files is not None
            else sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        )
        prefix = prefix.strip("/")
        entries: dict[str, TarEntry] = {}
        for n in names:
            arc = f"{prefix}/{n}" if prefix else n
            for d in parent_dirs(arc):
                entries.setdefault(d, TarEntry(d, "dir"))
            src = (directory / n).resolve()
            entries[arc] = TarEntry(arc, "file", source=src, mode=0o755 if os.access(src, os.X_OK) else 0o644)
        return cls.from_entries(entries.values(), **kw)

    @classmethod
    def from_bytes(cls, files: Mapping[str, bytes], **kw) -> "Layer":
        entries: dict[str, TarEntry] = {}
        for arc, data in files.items():
            for d in parent_dirs(arc):
                entries.setdefault(d, TarEntry(d, "dir"))
            entries[arc.strip("/")] = TarEntry(arc.strip("/"), "file", data=data)
        return cls.from_entries(entries.values(), **kw)

    @classmethod
    def blob(cls, data: bytes, media_type: str, annotations: Optional[Mapping] = None) -> "Layer":
        """A non-tar blob (config, empty descriptor) held in memory."""
        d = V.sha256_digest(data)
        return cls(media_type, d, len(data), d, dict(annotations or {}), (data,))
