"""Strict streaming readers for layer blobs: gzip/zstd decompression and tar (ustar, PAX, GNU long names).

Hostile input ends in one OCIError naming the layer, never a traceback or a
spin: PAX records are parsed by their grammar (`<len> <key>=<value>\\n`, UTF-8
keys, a decimal non-negative `size`), negative or huge header sizes are
refused, a corrupt or truncated gzip/zstd stream is an error, and a
compressed layer may not expand past `ExtractLimits`. Called by
kaito.image_builder.oci.extract (which writes the members it yields).
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from kaito.image_builder.oci.errors import OCIError
from kaito.presets.errors import InvalidInput

MAX_META = 1 << 20  # a PAX or GNU long-name header larger than this is an attack, not a name
_DECIMAL = re.compile(rb"^[0-9]{1,20}$")


@dataclass(frozen=True)
class ExtractLimits:
    """What one pull may write; a layer past a limit is refused (env: KAITO_PULL_MAX_BYTES, KAITO_PULL_MAX_RATIO)."""

    max_bytes: int = 1 << 40
    """Total file bytes one pull writes. 1 TiB: above any preset's weights (a 405B model in bf16 is ~810 GB)."""

    max_ratio: float = 100.0
    """Largest expansion of a compressed layer (tar bytes per compressed byte). Code and config layers
    compress 2-10x, weights ~1x; gzip's ceiling is ~1000x, which only crafted (or all-zero) data reaches."""

    ratio_floor: int = 16 << 20
    """The ratio applies only once a layer has expanded past this many bytes, so small, very compressible
    layers (a sparse file, a config of zeros) still pass while a 64 KiB gzip that becomes 64 MiB does not."""

    @classmethod
    def from_env(cls, max_bytes: Optional[int] = None, max_ratio: Optional[float] = None) -> "ExtractLimits":
        """Explicit values, else KAITO_PULL_MAX_BYTES / KAITO_PULL_MAX_RATIO, else the defaults."""

        def env(name: str, conv):
            raw = os.environ.get(name)
            if not raw:
                return None
            try:
                v = conv(raw)
            except ValueError:
                raise InvalidInput(f"{name}={raw!r}: give a positive number") from None
            if v <= 0:
                raise InvalidInput(f"{name}={raw!r}: give a positive number")
            return v

        mb = max_bytes if max_bytes is not None else env("KAITO_PULL_MAX_BYTES", int)
        mr = max_ratio if max_ratio is not None else env("KAITO_PULL_MAX_RATIO", float)
        for field, v in (("max_bytes", mb), ("max_ratio", mr)):
            if v is not None and v <= 0:
                raise InvalidInput(f"{field} {v!r}: give a positive number")
        return cls(max_bytes=mb or cls.max_bytes, max_ratio=mr or cls.max_ratio)


class Budget:
    """Bytes written so far by one pull (shared by its parallel layers) against `ExtractLimits.max_bytes`."""

    def __init__(self, limits: ExtractLimits) -> None:
        self.limits, self.used, self._lock = limits, 0, threading.Lock()

    def take(self, n: int, what: str) -> None:
        with self._lock:
            self.used += n
            over = self.used > self.limits.max_bytes
        if over:
            raise OCIError(
                f"extracting {what}: the pull would write more than {self.limits.max_bytes} bytes "
                "(raise the limit with --max-bytes or KAITO_PULL_MAX_BYTES if the image is really that big)"
            )


def _ratio_guard(limits: ExtractLimits, what: str) -> Callable[[int, int], None]:
    def check(consumed: int, produced: int) -> None:
        if produced > limits.ratio_floor and produced > limits.max_ratio * max(consumed, 1):
            raise OCIError(
                f"extracting {what}: the compressed layer expands more than {limits.max_ratio:g}x "
                f"({consumed} bytes became over {produced}); refused as a decompression bomb "
                "(raise --max-ratio or KAITO_PULL_MAX_RATIO to allow it)"
            )

    return check


def _inflate(chunks: Iterable[bytes], new, errors, kind: str, what: str, check) -> Iterator[bytes]:
    """Decompress a stream of one or more gzip members / zstd frames (both valid); trailing NULs are padding."""
    d, consumed, produced, started = new(), 0, 0, False
    try:
        for c in chunks:
            consumed += len(c)
            while c:
                if d.eof:
                    if not c.strip(b"\0"):
                        break
                    d = new()
                out = d.decompress(c)
                started = True
                c = d.unused_data if d.eof else b""
                produced += len(out)
                check(consumed, produced)
                if out:
                    yield out
    except errors as e:
        raise OCIError(f"extracting {what}: corrupt {kind} stream ({e})") from None
    if started and not d.eof:
        raise OCIError(f"extracting {what}: the {kind} stream ends early (truncated layer)")


def decompressed(
    chunks: Iterable[bytes], media_type: str, what: str = "a layer", limits: Optional[ExtractLimits] = None
) -> Iterator[bytes]:
    """Undo a layer's gzip/zstd compression (by media type suffix), refusing corrupt streams and bombs."""
    check = _ratio_guard(limits or ExtractLimits(), what)
    if media_type.endswith("gzip"):
        return _inflate(chunks, lambda: zlib.decompressobj(wbits=31), zlib.error, "gzip", what, check)
    if media_type.endswith("zstd"):
        import zstandard

        new = zstandard.ZstdDecompressor().decompressobj
        return _inflate(chunks, new, zstandard.ZstdError, "zstd", what, check)
    return iter(chunks)


class Reader:
    """Exact-size reads and copies over a chunk iterator, without joining big buffers."""

    def __init__(self, chunks: Iterable[bytes], what: str) -> None:
        self.it, self.buf, self.what = iter(chunks), b"", what

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
        if n < 0:  # callers validate sizes; a negative one here would loop forever
            raise OCIError(f"reading {self.what}: negative entry size {n}")
        while n:
            if not self.buf:
                self.buf = next(self.it, b"")
                if not self.buf:
                    raise OCIError(f"reading {self.what}: the tar stream ended inside a file")
            part, self.buf = (self.buf, b"") if len(self.buf) <= n else (self.buf[:n], self.buf[n:])
            if write:
                write(part)
            n -= len(part)

    def drain(self) -> None:
        self.buf = b""
        for _ in self.it:
            pass


def parse_pax(data: bytes, what: str) -> dict[str, str]:
    """PAX extended header records, by POSIX's grammar: `<decimal length> <key>=<value>\\n`."""
    out, pos = {}, 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        sp = data.find(b" ", pos, pos + 21)
        if sp <= pos or not _DECIMAL.match(data[pos:sp]):
            raise OCIError(f"reading {what}: malformed PAX record at byte {pos} (no '<length> ' prefix)")
        end = pos + int(data[pos:sp])
        if end <= sp + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise OCIError(f"reading {what}: malformed PAX record at byte {pos} (bad length or no newline)")
        key, eq, val = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise OCIError(f"reading {what}: malformed PAX record at byte {pos} (no 'key=value')")
        try:
            k = key.decode("utf-8")
        except UnicodeDecodeError:
            raise OCIError(f"reading {what}: PAX key {key[:40]!r} is not UTF-8") from None
        out[k] = val.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _meta(r: Reader, ti: tarfile.TarInfo, what: str) -> bytes:
    if ti.size > MAX_META:
        raise OCIError(f"reading {what}: a {ti.size}-byte tar metadata header (over {MAX_META}); refused")
    data = r.read(ti.size + (-ti.size % 512))
    if len(data) < ti.size:
        raise OCIError(f"reading {what}: the tar stream ended inside a PAX or long-name header")
    return data[: ti.size]


def members(r: Reader, what: str) -> Iterator[tarfile.TarInfo]:
    """Yield each member's TarInfo (PAX and GNU long names applied); the caller consumes `ti.size` bytes."""
    ext: dict[str, str] = {}
    glob: dict[str, str] = {}
    while True:
        hdr = r.read(512)
        if len(hdr) < 512:
            raise OCIError(f"reading {what}: truncated tar header")
        if hdr == b"\0" * 512:
            return
        try:
            ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise OCIError(f"reading {what}: bad tar header ({e})") from None
        if ti.size < 0:
            raise OCIError(f"reading {what}: entry {ti.name!r} has negative size {ti.size}")
        if ti.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            (glob if ti.type == tarfile.XGLTYPE else ext).update(parse_pax(_meta(r, ti, what), what))
            continue
        if ti.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            val = _meta(r, ti, what).rstrip(b"\0").decode("utf-8", "surrogateescape")
            ext["path" if ti.type == tarfile.GNUTYPE_LONGNAME else "linkpath"] = val
            continue
        fields = {**glob, **ext}
        ext = {}
        if "path" in fields:
            ti.name = fields["path"]
        if "linkpath" in fields:
            ti.linkname = fields["linkpath"]
        if "size" in fields:
            if not _DECIMAL.match(fields["size"].encode("utf-8", "surrogateescape")):
                raise OCIError(f"reading {what}: entry {ti.name!r} has PAX size {fields['size']!r}, not a byte count")
            ti.size = int(fields["size"])
        yield ti
        r.copy(-ti.size % 512, None)  # the caller consumed ti.size bytes; skip the padding
