"""`pull(ref, dest)`: what init containers run (`kaito image pull REF DIR`), and how tuning/runtime fetch images.

Layers download in parallel (bounded), each verified while it streams and
extracted safely into its own staging directory; a verified layer is marked
done so a rerun skips it. Only when every layer is in does the tree move to
`dest` (a rename; or, when `dest` is an existing empty directory such as a
volume mount point, a move of its entries with the marker written last).
A plain pull keeps only the model content: an adapter image's `/data` or a
preset image's (or its ModelPack's) `/workspace/weights`, prefix stripped;
`full=True` (`--rootfs`) extracts everything as-is.

Hostile input is refused where it enters (digests in descriptors, links
judged against the tree as extracted and again once all layers are applied,
malformed tar/PAX/gzip/zstd, `ExtractLimits` on bytes and expansion) and a
failed pull leaves nothing: only a network failure keeps verified layers, and
only for a caller that will rerun (`resumable`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError, RegistryError
from kaito.image_builder.oci.extract import (
    OPAQUE,
    WHITEOUT,
    Budget,
    ExtractLimits,
    check_links,
    decompressed,
    extract_tar,
    verified,
    write_raw,
)
from kaito.image_builder.oci.image import Image
from kaito.image_builder.oci.progress import NULL, Progress
from kaito.image_builder.transfer import Connection, RefLike, as_ref, connection, read_image
from kaito.presets import retry
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.fsio import atomic_write_json

MARKER = ".kaito-pull.json"
TAR_TYPES = (
    V.OCI_LAYER,
    V.OCI_LAYER_GZIP,
    V.OCI_LAYER_ZSTD,
    V.DOCKER_LAYER,
    V.DOCKER_LAYER_GZIP,
    V.MODEL_WEIGHT_TAR,
    V.MODEL_WEIGHT_CONFIG_TAR,
    V.MODEL_DOC_TAR,
    V.MODEL_CODE_TAR,
    "application/vnd.cncf.model.dataset.v1.tar",
)


@dataclass(frozen=True)
class PullResult:
    """A finished pull: the manifest digest, the destination and the files it holds (relative paths)."""

    ref: str
    digest: str
    dest: Path
    files: tuple[str, ...]
    bytes_downloaded: int
    layers: int
    up_to_date: bool = False


def _content_layers(img: Image, full: bool) -> tuple[tuple, str]:
    """(layers to fetch, prefix to strip) for this pull mode."""
    if full:
        return img.layers, ""
    root = img.annotations.get(V.ANN_CONTENT_ROOT)
    if root is None and img.artifact_type == V.MODEL_ARTIFACT:
        root = ""
    tagged = tuple(x for x in img.layers if V.MODEL_FILEPATH in x.annotations)
    return (tagged or img.layers), (root or "")


def _raw_name(x, img: Image) -> Optional[str]:
    """The file name of a layer whose blob *is* a file (ModelPack `.raw`, or an oras-style titled blob)."""
    if x.media_type.endswith(".raw"):
        return x.annotations.get(V.MODEL_FILEPATH) or x.annotations.get(V.ANN_TITLE) or x.digest.split(":")[1]
    if (
        V.ANN_TITLE in x.annotations
        and V.MODEL_FILEPATH not in x.annotations
        and V.ANN_CONTENT_ROOT not in img.annotations
        and img.config_media_type not in (V.OCI_CONFIG, V.DOCKER_CONFIG)
        and x.annotations.get("io.deis.oras.content.unpack") != "true"
    ):
        return x.annotations[V.ANN_TITLE]
    return None


def _merge(layer_dir: Path, tree: Path, keep: bool = False) -> None:
    """Apply one extracted layer onto the tree (whiteouts honoured), by renames; with `keep` (the same
    layer comes again later in the image) by hard links, so the layer directory stays whole."""
    for dirpath, dirnames, filenames in os.walk(layer_dir, topdown=True):
        target_dir = tree / Path(dirpath).relative_to(layer_dir)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        # Whiteouts hide what lower layers put here, so they go first (opaque first of all), then
        # this layer's own entries; names were checked at extraction (no '.', '..' or reserved names).
        for name in sorted(filenames + links, key=lambda n: (n != OPAQUE, not n.startswith(WHITEOUT), n)):
            if name.startswith(WHITEOUT):
                _whiteout(target_dir, name)
            else:
                _place(Path(dirpath) / name, target_dir / name, keep)
        for d in dirnames:
            t = target_dir / d
            if os.path.lexists(t) and (t.is_symlink() or not t.is_dir()):
                t.unlink()
            t.mkdir(exist_ok=True)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def _whiteout(target_dir: Path, name: str) -> None:
    """Hide what lower layers put in `target_dir`: everything (opaque) or the one named entry."""
    if name == OPAQUE:
        for child in target_dir.iterdir() if target_dir.is_dir() else []:
            _remove(child)
    else:
        _remove(target_dir / name[len(WHITEOUT) :])


def _place(src: Path, dst: Path, keep: bool) -> None:
    """Put one non-directory entry at `dst`: moved, or (`keep`) linked so `src` stays for a later use."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    if not keep:
        os.replace(src, dst)
    elif src.is_symlink():
        if os.path.lexists(dst):
            dst.unlink()
        os.symlink(os.readlink(src), dst)
    elif not (os.path.lexists(dst) and not dst.is_symlink() and os.path.samefile(src, dst)):
        # (rename() between two links to one file does nothing and would leave tmp behind)
        tmp = dst.with_name(f".{dst.name}.kaito-link")
        if os.path.lexists(tmp):
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)


def _guess_root(tree: Path) -> Path:
    """For images without Kaito's annotations: an adapter's data/ or a model image's workspace/weights/."""
    top = [p.name for p in tree.iterdir()]
    if top == ["data"] and (tree / "data").is_dir():
        return tree / "data"
    if (tree / "workspace" / "weights").is_dir():
        return tree / "workspace" / "weights"
    return tree


def _files(root: Path) -> tuple[str, ...]:
    return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MARKER))


class _Retry(retry.TransientError):
    """A layer fetch cut by the network or a busy registry; carries the RegistryError for the caller."""

    def __init__(self, cause: RegistryError) -> None:
        super().__init__(str(cause), status=cause.status)
        self.cause = cause


def _transient(e: RegistryError) -> bool:
    """Worth fetching the layer again: no response at all, a body cut after a good (2xx) answer,
    or a status the shared retry policy retries."""
    return e.status is None or e.status < 300 or retry.retryable_status(e.status)


@dataclass
class _Pull:
    """One pull in progress: the image, where it stages, and what it has written."""

    ref: object
    img: Image
    layers: tuple
    strip: str
    staging: Path
    full: bool
    progress: Progress
    budget: Budget
    limits: ExtractLimits
    retries: int
    downloaded: int = 0

    def what(self, x) -> str:
        return f"layer {x.digest} of {self.ref}"

    def fetch_once(self, x, ldir: Path) -> None:
        """Download, verify and extract layer `x` into a fresh `ldir`."""
        if ldir.exists():
            shutil.rmtree(ldir)
        ldir.mkdir()
        name = x.annotations.get(V.MODEL_FILEPATH) or x.digest.split(":", 1)[1][:12]
        adv = self.progress.task(x.digest, f"pull {name}", x.size)

        def count(n: int) -> None:
            self.downloaded += n
            adv(n)

        what = self.what(x)
        stream = verified(x.open(), x.digest, x.size, what, count)
        raw = _raw_name(x, self.img)
        if raw:
            write_raw(stream, ldir, raw, what, self.budget)
            return
        tar = decompressed(stream, x.media_type, what, self.limits)
        extract_tar(tar, ldir, what, strip=self.strip, allow_absolute_links=self.full, budget=self.budget)

    def try_once(self, x, ldir: Path) -> None:
        """`fetch_once`, its failures sorted: transient ones to retry, parser surprises as one line."""
        try:
            self.fetch_once(x, ldir)
        except RegistryError as e:
            # A dropped connection or a busy registry mid-layer: fetch that layer again (others keep their work).
            if _transient(e):
                raise _Retry(e) from None
            raise
        except (ValueError, EOFError, LookupError) as e:  # a parser corner we did not foresee: still one line
            if isinstance(e, KaitoError):
                raise
            raise OCIError(f"extracting {self.what(x)}: {type(e).__name__}: {e}") from None

    def fetch(self, x) -> None:
        """Bring layer `x` into staging/layers/<hex> once; a `.done` mark lets a rerun skip it."""
        hex_ = x.digest.split(":", 1)[1]  # checked against the OCI grammar when the manifest was read
        ldir, done = self.staging / "layers" / hex_, self.staging / "layers" / f"{hex_}.done"
        if done.exists():
            self.progress.finish(x.digest, "verified earlier")
            return
        try:
            retry.call(lambda: self.try_once(x, ldir), policy=retry.Backoff(attempts=self.retries + 1))
        except _Retry as e:
            raise e.cause from None
        done.touch()
        self.progress.finish(x.digest, "done")

    def fetch_all(self, jobs: int) -> None:
        # An image may list one layer twice (two empty layers, say): fetch it once, apply it at each place.
        unique = list({x.digest: x for x in self.layers}.values())
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="kaito-pull") as ex:
            futures = [ex.submit(self.fetch, x) for x in unique]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            raise errors[0]

    def merge(self) -> Path:
        """Apply the layers in order into staging/tree; returns the content root (links re-checked there)."""
        tree = self.staging / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir()
        for i, x in enumerate(self.layers):
            again = any(y.digest == x.digest for y in self.layers[i + 1 :])
            _merge(self.staging / "layers" / x.digest.split(":", 1)[1], tree, keep=again)
        check_links(tree, f"image {self.ref} (all layers applied)", self.full)
        if self.full or self.strip or V.ANN_CONTENT_ROOT in self.img.annotations:
            return tree
        return _guess_root(tree)

    def assemble(self, jobs: int) -> tuple[Path, tuple[str, ...]]:
        """Fetch every layer, apply them, and mark the result with what it holds: (content root, files)."""
        self.fetch_all(jobs)
        root = self.merge()
        files = _files(root)
        marker = {"ref": str(self.ref), "digest": self.img.digest, "full": self.full, "files": list(files)}
        atomic_write_json(root / MARKER, marker)
        return root, files


def _install(root: Path, dest: Path, staging: Path, into_existing: bool) -> None:
    """Move the finished tree to `dest` (marker last when filling an existing mount point)."""
    if into_existing:
        for p in sorted(root.iterdir(), key=lambda p: p.name == MARKER):  # marker last
            os.replace(p, dest / p.name)
    elif dest.exists():
        old = dest.parent / f".{dest.name}.kaito-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(root, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(root, dest)
    shutil.rmtree(staging)


def _check_layers(ref, img: Image, layers) -> None:
    for x in layers:
        if x.media_type not in TAR_TYPES and not _raw_name(x, img):
            raise OCIError(
                f"pulling {ref}: layer {x.digest} has media type {x.media_type!r}: not a tar layer, and no "
                f"file name annotation ({V.ANN_TITLE} or {V.MODEL_FILEPATH}) to store it under"
            )


def _up_to_date(ref, img: Image, dest: Path, full: bool) -> Optional[PullResult]:
    """The finished pull already at `dest` (its marker names this digest and mode), else None."""
    marker = dest / MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return None
    if isinstance(done, dict) and done.get("digest") == img.digest and done.get("full", False) == full:
        return PullResult(str(ref), img.digest, dest, _files(dest), 0, len(img.layers), True)
    return None


def _fills_existing(dest: Path, overwrite: bool) -> bool:
    """True when `dest` is an empty directory (a mount point) to fill in place; refuses a foreign one."""
    into_existing = dest.is_dir() and all(p.name in (".kaito-partial", MARKER) for p in dest.iterdir())
    if dest.exists() and not into_existing and not overwrite:
        raise InvalidInput(f"pull destination {dest} exists and is not empty; remove it or pass --force")
    return into_existing


def _staging(ref, digest: str, dest: Path, into_existing: bool) -> Path:
    """The staging directory beside (or inside) `dest`, reused only when it holds this same image."""
    staging = (dest / ".kaito-partial") if into_existing else dest.parent / f".{dest.name}.kaito-partial"
    state = staging / "state.json"
    if staging.exists():
        try:
            same = json.loads(state.read_text()).get("digest") == digest
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            shutil.rmtree(staging)
    (staging / "layers").mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"ref": str(ref), "digest": digest})
    return staging


@contextlib.contextmanager
def _cleaned_on_failure(staging: Path, resumable: bool) -> Iterator[None]:
    """A bad layer (tampered, unsafe, malformed) poisons the whole pull: drop everything staged.
    A network failure keeps verified layers for the rerun, when there will be one."""
    try:
        yield
    except Exception as e:
        if not (resumable and isinstance(e, RegistryError)):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def pull(
    ref: RefLike,
    dest: Union[str, Path],
    *,
    auth_file=None,
    insecure: Optional[bool] = None,
    full: bool = False,
    jobs: int = 4,
    progress: Progress = NULL,
    overwrite: bool = False,
    conn: Optional[Connection] = None,
    retries: int = 3,
    resumable: bool = True,
    limits: Optional[ExtractLimits] = None,
) -> PullResult:
    """Pull `ref` into `dest` (see the module docstring); rerunning a finished pull is a no-op.

    A failed pull leaves nothing behind, except, when `resumable`, the verified layers of a pull
    cut by the network (the rerun skips them). Callers that never rerun (the runtime's adapter
    loads, into a fresh directory each time) pass `resumable=False`. `retries` counts the
    extra tries of one layer after a transient failure.
    """
    ref, dest = as_ref(ref), Path(dest)
    with connection(conn, auth_file, insecure) as c:
        img = read_image(ref, c)
        done = _up_to_date(ref, img, dest, full)
        if done:
            return done
        layers, strip = _content_layers(img, full)
        _check_layers(ref, img, layers)
        into_existing = _fills_existing(dest, overwrite)
        staging = _staging(ref, img.digest, dest, into_existing)
        limits = limits or ExtractLimits.from_env()
        job = _Pull(ref, img, layers, strip, staging, full, progress, Budget(limits), limits, retries)
        with _cleaned_on_failure(staging, resumable):
            root, files = job.assemble(jobs)
            _install(root, dest, staging, into_existing)
        return PullResult(str(ref), img.digest, dest, files, job.downloaded, len(layers))
