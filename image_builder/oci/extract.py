"""Verified, safe, streaming layer extraction (the pull side's last step).

`verified(chunks, digest, size)` hashes a blob stream as it passes and fails
at its end on any mismatch; `decompressed` (kaito.image_builder.oci.tarstream)
undoes gzip/zstd; `extract_tar` writes the members of a tar stream with large
sequential writes. Refused, with the entry named: absolute paths, `..`,
device files and FIFOs, writes through a symlink, malformed whiteouts, and
links that lead outside the root. Links are judged against the tree as
extracted (Python tarfile's `data_filter` rule): a link target is resolved
through the links already on disk, and `check_links` re-resolves every
symlink once the tree is complete, so the order of entries (or layers) cannot
smuggle an escape. Called by kaito.image_builder.pull.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError, UnsafeLayer, VerificationError
from kaito.image_builder.oci.layer import PipelinedSha256
from kaito.image_builder.oci.tarstream import Budget, ExtractLimits, Reader, decompressed, members

__all__ = ["Budget", "ExtractLimits", "check_links", "decompressed", "extract_tar", "verified", "write_raw"]

FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
MAX_HOPS = 40  # Linux's symlink limit (ELOOP)


def verified(
    chunks: Iterable[bytes], digest: str, size: int, what: str, progress: Optional[Callable[[int], None]] = None
) -> Iterator[bytes]:
    """Pass `chunks` through, checking size and digest at the end (raising VerificationError).

    Hashing runs on a helper thread, overlapping the download and the writes.
    """
    V.check_digest(digest, f"verifying {what}")
    h, n = PipelinedSha256(V.new_hash(digest)), 0
    try:
        for c in chunks:
            h.update(c)
            n += len(c)
            if n > size:
                raise VerificationError(f"verifying {what}: more than the {size} bytes its descriptor declares")
            if progress:
                progress(len(c))
            yield c
        got = f"{h.h.name}:{h.hexdigest()}"
    finally:
        h.close()
    if n != size or got != digest:
        raise VerificationError(f"verifying {what}: got {n} bytes with digest {got}, expected {size} bytes {digest}")


def resolve(root: Path, rel: str) -> tuple[str, str]:
    """Follow `rel` under `root` through the symlinks now on disk, as the kernel would.

    Returns ("inside", resolved relative path), ("outside", why) for a climb above
    the root or a loop, or ("absolute", target) on meeting an absolute symlink.
    """
    parts, hops = rel.split("/"), 0
    stack: list[str] = []
    while parts:
        p = parts.pop(0)
        if p in ("", "."):
            continue
        if p == "..":
            if not stack:
                return "outside", "climbs above the destination"
            stack.pop()
            continue
        cur = os.path.join(root, *stack, p)
        if not os.path.islink(cur):
            stack.append(p)
            continue
        hops += 1
        if hops > MAX_HOPS:
            return "outside", "loops through symlinks"
        target = os.readlink(cur)
        if target.startswith("/"):
            return "absolute", target
        parts = target.split("/") + parts
    return "inside", "/".join(stack)


def _check_symlink(root: Path, rel: str, target: str, allow_absolute: bool, what: str, name: str) -> None:
    """Refuse a symlink at `rel` whose target, resolved through the tree, leaves `root`."""
    if target.startswith("/") and not allow_absolute:
        raise UnsafeLayer(f"extracting {what}: symlink {name!r} points to the absolute path {target!r}")
    if "\0" in target:
        raise UnsafeLayer(f"extracting {what}: symlink {name!r} has a NUL byte in its target")
    if target.startswith("/"):
        return  # rootfs mode: absolute links are kept, and nothing is ever written through them
    kind, why = resolve(root, posixpath.join(posixpath.dirname(rel), target))
    if kind == "outside" or (kind == "absolute" and not allow_absolute):
        raise UnsafeLayer(f"extracting {what}: symlink {name!r} -> {target!r} escapes the destination ({why})")


def _escaping_links(root: Path, what: str, allow_absolute: bool) -> list[tuple[str, UnsafeLayer]]:
    """Every symlink under `root` that, resolved against the tree as it is now, leaves it."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                rel = os.path.relpath(p, root)
                try:
                    _check_symlink(root, rel, os.readlink(p), allow_absolute, what, rel)
                except UnsafeLayer as e:
                    bad.append((p, e))
    return bad


def _remove_escaping_links(root: Path, what: str, allow_absolute: bool) -> list[UnsafeLayer]:
    """Unlink escaping symlinks until none is left: removing one can change where another resolves."""
    found: list[UnsafeLayer] = []
    while bad := _escaping_links(root, what, allow_absolute):
        for p, e in bad:
            os.unlink(p)
            found.append(e)
    return found


def check_links(root: Path, what: str, allow_absolute: bool = False) -> None:
    """Re-resolve every symlink under `root` against the finished tree (a link may lean on one made later).

    A refused tree never keeps a door out, even before its caller cleans up: every escaping
    link is removed before the first one is reported.
    """
    found = _remove_escaping_links(Path(root), what, allow_absolute)
    if found:
        raise found[0]


def _clean(name: str, what: str) -> Optional[str]:
    if "\0" in name:
        raise UnsafeLayer(f"extracting {what}: entry {name!r} has a NUL byte")
    if name.startswith("/"):
        raise UnsafeLayer(f"extracting {what}: entry {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"extracting {what}: entry {name!r} climbs out of the destination with '..'")
    return "/".join(parts) or None


def _check_whiteout(rel: str, ti: tarfile.TarInfo, what: str) -> None:
    """OCI whiteouts: `.wh.<name>` hides <name> of lower layers, `.wh..wh..opq` empties the directory.

    Both are empty regular files; other `.wh..wh.` names are reserved, and a whiteout must name a
    real sibling (not '', '.' or '..', which would reach the parent directory).
    """
    base = posixpath.basename(rel)
    if not base.startswith(WHITEOUT):
        return
    if ti.type not in FILE_TYPES:
        raise UnsafeLayer(f"extracting {what}: whiteout {ti.name!r} is not a regular file")
    if base == OPAQUE:
        return
    victim = base[len(WHITEOUT) :]
    if victim in ("", ".", "..") or victim.startswith(WHITEOUT):
        raise UnsafeLayer(f"extracting {what}: malformed whiteout {ti.name!r} (it names no sibling entry)")


def _strip(rel: Optional[str], strip: str) -> Optional[str]:
    if rel is None or not strip:
        return rel
    return rel[len(strip) + 1 :] if rel.startswith(strip + "/") else None


class _Tree:
    """Writes one layer's entries under `root`; parents are checked once and never followed through a symlink."""

    def __init__(self, root: Path, r: Reader, what: str, strip: str, allow_absolute: bool, budget: Budget) -> None:
        self.root, self.r, self.what, self.strip = root, r, what, strip
        self.allow_absolute, self.budget = allow_absolute, budget
        self.safe_dirs = {""}
        self.files: list[str] = []

    def parent_of(self, rel: str) -> str:
        parent = posixpath.dirname(rel)
        if parent in self.safe_dirs:
            return str(self.root / rel)
        cur = ""
        for part in parent.split("/"):
            cur = f"{cur}/{part}" if cur else part
            if cur in self.safe_dirs:
                continue
            p = self.root / cur
            if not os.path.lexists(p):
                os.mkdir(p, 0o755)
            elif os.path.islink(p) or not os.path.isdir(p):
                raise UnsafeLayer(
                    f"extracting {self.what}: entry {rel!r} would be written through the non-directory {cur!r}"
                )
            self.safe_dirs.add(cur)
        return str(self.root / rel)

    def replace(self, rel: str) -> str:
        """The path for a new non-directory entry at `rel`, whatever non-directory was there removed."""
        path = self.parent_of(rel)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        return path

    def add(self, ti: tarfile.TarInfo) -> None:
        what = self.what
        rel = _strip(_clean(ti.name, what), self.strip)
        if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            raise UnsafeLayer(f"extracting {what}: entry {ti.name!r} is a device file or FIFO; layers carry neither")
        if rel is None:
            self.r.copy(ti.size, None)
        elif ti.type == tarfile.DIRTYPE:
            _check_whiteout(rel, ti, what)
            path = self.parent_of(rel)
            if os.path.islink(path):
                raise UnsafeLayer(f"extracting {what}: directory {ti.name!r} replaces a symlink")
            os.makedirs(path, 0o755, exist_ok=True)
            self.safe_dirs.add(rel)
        elif ti.type == tarfile.SYMTYPE:
            _check_whiteout(rel, ti, what)
            _check_symlink(self.root, rel, ti.linkname, self.allow_absolute, what, ti.name)
            os.symlink(ti.linkname, self.replace(rel))
        elif ti.type == tarfile.LNKTYPE:
            _check_whiteout(rel, ti, what)
            self.hardlink(rel, ti)
        elif ti.type in FILE_TYPES:
            _check_whiteout(rel, ti, what)
            self.budget.take(ti.size, what)
            path = self.replace(rel)
            mode = 0o755 if ti.mode & 0o111 else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as f:
                self.r.copy(ti.size, f.write)
            self.files.append(rel)
        else:
            raise UnsafeLayer(f"extracting {what}: entry {ti.name!r} has unsupported tar type {ti.type!r}")

    def hardlink(self, rel: str, ti: tarfile.TarInfo) -> None:
        """A hard link binds an inode now: its target, resolved through the tree so far, must be a file inside."""
        tgt = _strip(_clean(ti.linkname, self.what), self.strip)
        kind, resolved = resolve(self.root, tgt) if tgt else ("outside", "")
        src = self.root / resolved
        if kind != "inside" or not os.path.isfile(src) or os.path.islink(src):
            raise UnsafeLayer(
                f"extracting {self.what}: hard link {ti.name!r} -> {ti.linkname!r} points outside the extracted files"
            )
        os.link(src, self.replace(rel), follow_symlinks=False)
        self.files.append(rel)


def extract_tar(
    chunks: Iterable[bytes],
    root: Path,
    what: str,
    *,
    strip: str = "",
    allow_absolute_links: bool = False,
    budget: Optional[Budget] = None,
) -> list[str]:
    """Extract a tar stream under `root` (which must exist); returns the regular files written (relative paths).

    With `strip`, only entries under that directory are written, with the prefix removed.
    `budget` counts file bytes against the pull's limit (default: ExtractLimits()).
    """
    root, r = Path(root), Reader(chunks, what)
    tree = _Tree(root, r, what, strip.strip("/"), allow_absolute_links, budget or Budget(ExtractLimits()))
    try:
        for ti in members(r, what):
            try:
                tree.add(ti)
            except OSError as e:
                # e.g. a file and a directory under one name: refuse the layer, say which entry
                raise OCIError(f"extracting {what}: entry {ti.name!r}: {e.strerror or e}") from None
    except BaseException:
        # A link made while it pointed inside may have been turned outward by a later entry of
        # this refused layer: take every such door out before reporting the refusal.
        _remove_escaping_links(root, what, allow_absolute_links)
        raise
    r.drain()  # the rest of the stream must still be hashed and verified
    check_links(root, what, allow_absolute_links)
    return tree.files


def write_raw(chunks: Iterable[bytes], root: Path, name: str, what: str, budget: Optional[Budget] = None) -> str:
    """Store a blob that is itself a file (ModelPack `.raw` layers, oras-style artifacts) as `root/name`."""
    rel = _clean(name, what)
    if rel is None:
        raise UnsafeLayer(f"extracting {what}: file name {name!r} is empty")
    budget = budget or Budget(ExtractLimits())
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.realpath(path.parent) != os.path.join(os.path.realpath(root), posixpath.dirname(rel)).rstrip("/"):
        raise UnsafeLayer(f"extracting {what}: file name {name!r} leads through a symlink")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        for c in chunks:
            budget.take(len(c), what)
            f.write(c)
    return rel
