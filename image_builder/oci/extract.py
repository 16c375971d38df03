"""Verified, safe, streaming layer extraction (the pull side's last step).

`verified(chunks, digest, size)` hashes a blob stream as it passes and fails
at its end on any mismatch; `decompressed` undoes gzip/zstd; `extract_tar`
parses the tar itself (ustar, PAX, GNU long names) and writes members with
large sequential writes. Refused, with the entry named: absolute paths,
`..`, symlinks or hard links that lead outside the root, writes through a
symlink, device files and FIFOs. Called by kaito.image_builder.pull.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from kaito.image_builder.oci.errors import OCIError, UnsafeLayer, VerificationError
from kaito.image_builder.oci.layer import PipelinedSha256

FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def verified(
    chunks: Iterable[bytes], digest: str, size: int, what: str, progress: Optional[Callable[[int], None]] = None
) -> Iterator[bytes]:
    """Pass `chunks` through, checking size and sha256 at the end (raising VerificationError).

    Hashing runs on a helper thread, overlapping the download and the writes.
    """
    h, n = PipelinedSha256(), 0
    try:
        for c in chunks:
            h.update(c)
            n += len(c)
            if n > size:
                raise VerificationError(f"verifying {what}: more than the {size} bytes its descriptor declares")
            if progress:
                progress(len(c))
            yield c
        got = "sha256:" + h.hexdigest()
    finally:
        h.close()
    if n != size or got != digest:
        raise VerificationError(f"verifying {what}: got {n} bytes with digest {got}, expected {size} bytes {digest}")


def decompressed(chunks: Iterable[bytes], media_type: str) -> Iterator[bytes]:
    if media_type.endswith("gzip"):
        d = zlib.decompressobj(wbits=47)
        for c in chunks:
            out = d.decompress(c)
            if out:
                yield out
        tail = d.flush()
        if tail:
            yield tail
    elif media_type.endswith("zstd"):
        import zstandard

        d = zstandard.ZstdDecompressor().decompressobj()
        for c in chunks:
            out = d.decompress(c)
            if out:
                yield out
    else:
        yield from chunks


class _Reader:
    """Exact-size reads and copies over a chunk iterator, without joining big buffers."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.it, self.buf = iter(chunks), b""

    def read(self, n: int) -> bytes:
        parts, have = [self.buf], len(self.buf)
        while have < n:
            c = next(self.it, None)
            if c is None:
                break
            parts.append(c)
            have += len(c)
        data = b"".join(parts)
        self.buf = data[n:]
        return data[:n]

    def copy(self, n: int, write: Optional[Callable[[bytes], object]]) -> None:
        while n:
            if not self.buf:
                self.buf = next(self.it, b"")
                if not self.buf:
                    raise OCIError("reading a layer: the tar stream ended inside a file")
            part, self.buf = (self.buf, b"") if len(self.buf) <= n else (self.buf[:n], self.buf[n:])
            if write:
                write(part)
            n -= len(part)

    def drain(self) -> None:
        self.buf = b""
        for _ in self.it:
            pass


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, val = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = val.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(r: _Reader) -> Iterator[tuple[str, tarfile.TarInfo]]:
    ext: dict[str, str] = {}
    glob: dict[str, str] = {}
    while True:
        hdr = r.read(512)
        if len(hdr) < 512:
            raise OCIError("reading a layer: truncated tar header")
        if hdr == b"\0" * 512:
            return
        try:
            ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise OCIError(f"reading a layer: bad tar header ({e})") from None
        padded = ti.size + (-ti.size % 512)
        if ti.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            recs = _pax(r.read(padded)[: ti.size])
            (glob if ti.type == tarfile.XGLTYPE else ext).update(recs)
            continue
        if ti.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            val = r.read(padded)[: ti.size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            ext["path" if ti.type == tarfile.GNUTYPE_LONGNAME else "linkpath"] = val
            continue
        fields = {**glob, **ext}
        ext = {}
        if "path" in fields:
            ti.name = fields["path"]
        if "linkpath" in fields:
            ti.linkname = fields["linkpath"]
        if "size" in fields:
            ti.size = int(fields["size"])
        yield ti.name, ti
        # the caller consumed ti.size bytes; skip the padding
        r.copy(-ti.size % 512, None)


def _clean(name: str, what: str) -> Optional[str]:
    if "\0" in name:
        raise UnsafeLayer(f"extracting {what}: entry {name!r} has a NUL byte")
    if name.startswith("/"):
        raise UnsafeLayer(f"extracting {what}: entry {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"extracting {what}: entry {name!r} climbs out of the destination with '..'")
    return "/".join(parts) or None


def extract_tar(
    chunks: Iterable[bytes], root: Path, what: str, *, strip: str = "", allow_absolute_links: bool = False
) -> list[str]:
    """Extract a tar stream under `root` (which must exist); returns the regular files written (relative paths).

    With `strip`, only entries under that directory are written, with the prefix removed.
    """
    root = Path(root)
    r = _Reader(chunks)
    strip = strip.strip("/")
    safe_dirs: set[str] = {""}
    files: list[str] = []

    def ensure_parent(rel: str) -> str:
        parent = posixpath.dirname(rel)
        if parent in safe_dirs:
            return str(root / rel)
        cur = ""
        for part in parent.split("/"):
            cur = f"{cur}/{part}" if cur else part
            if cur in safe_dirs:
                continue
            p = root / cur
            if not os.path.lexists(p):
                os.mkdir(p, 0o755)
            elif os.path.islink(p) or not os.path.isdir(p):
                raise UnsafeLayer(
                    f"extracting {what}: entry {rel!r} would be written through the non-directory {cur!r}"
                )
            safe_dirs.add(cur)
        return str(root / rel)

    def remove_existing(path: str) -> None:
        if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
            os.unlink(path)

    def one(name: str, ti: tarfile.TarInfo) -> None:
        rel = _clean(name, what)
        if rel is not None and strip:
            rel = rel[len(strip) + 1 :] if rel.startswith(strip + "/") else None if rel != strip else None
        if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            raise UnsafeLayer(f"extracting {what}: entry {name!r} is a device file or FIFO; layers may not carry those")
        if rel is None:
            r.copy(ti.size, None)
            return
        if ti.type == tarfile.DIRTYPE:
            path = ensure_parent(rel)
            if os.path.islink(path):
                raise UnsafeLayer(f"extracting {what}: directory {name!r} replaces a symlink")
            os.makedirs(path, 0o755, exist_ok=True)
            safe_dirs.add(rel)
        elif ti.type == tarfile.SYMTYPE:
            target = ti.linkname
            if target.startswith("/"):
                if not allow_absolute_links:
                    raise UnsafeLayer(f"extracting {what}: symlink {name!r} points to the absolute path {target!r}")
            else:
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if resolved == ".." or resolved.startswith("../"):
                    raise UnsafeLayer(f"extracting {what}: symlink {name!r} -> {target!r} escapes the destination")
            path = ensure_parent(rel)
            remove_existing(path)
            os.symlink(target, path)
        elif ti.type == tarfile.LNKTYPE:
            tgt = _clean(ti.linkname, what)
            if tgt and strip:
                tgt = tgt[len(strip) + 1 :] if tgt.startswith(strip + "/") else None
            real_root = os.path.realpath(root)
            if (
                not tgt
                or os.path.islink(root / tgt)
                or not os.path.realpath(root / tgt).startswith(real_root + os.sep)
                or not os.path.isfile(root / tgt)
            ):
                raise UnsafeLayer(
                    f"extracting {what}: hard link {name!r} -> {ti.linkname!r} points outside the extracted files"
                )
            path = ensure_parent(rel)
            remove_existing(path)
            os.link(root / tgt, path)
            files.append(rel)
        elif ti.type in FILE_TYPES:
            path = ensure_parent(rel)
            remove_existing(path)
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o755 if ti.mode & 0o111 else 0o644
            )
            with os.fdopen(fd, "wb") as f:
                r.copy(ti.size, f.write)
            files.append(rel)
        else:
            raise UnsafeLayer(f"extracting {what}: entry {name!r} has unsupported tar type {ti.type!r}")

    for name, ti in _members(r):
        try:
            one(name, ti)
        except OSError as e:
            # e.g. a file and a directory under one name: refuse the layer, say which entry
            raise OCIError(f"extracting {what}: entry {name!r}: {e.strerror}") from None
    r.drain()  # the rest of the stream must still be hashed and verified
    return files


def write_raw(chunks: Iterable[bytes], root: Path, name: str, what: str) -> str:
    """Store a blob that is itself a file (ModelPack `.raw` layers, oras-style artifacts) as `root/name`."""
    rel = _clean(name, what)
    if rel is None:
        raise UnsafeLayer(f"extracting {what}: file name {name!r} is empty")
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.realpath(path.parent) != os.path.join(os.path.realpath(root), posixpath.dirname(rel)).rstrip("/"):
        raise UnsafeLayer(f"extracting {what}: file name {name!r} leads through a symlink")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        for c in chunks:
            f.write(c)
    return rel
