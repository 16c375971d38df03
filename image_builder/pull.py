"""`pull(ref, dest)`: what init containers run (`kaito image pull REF DIR`), and how tuning/runtime fetch images.

Layers download in parallel (bounded), each verified while it streams and
extracted safely into its own staging directory; a verified layer is marked
done so a rerun skips it. Only when every layer is in does the tree move to
`dest` (a rename; or, when `dest` is an existing empty directory such as a
volume mount point, a move of its entries with the marker written last).
A plain pull keeps only the model content: an adapter image's `/data` or a
preset image's (or its ModelPack's) `/workspace/weights`, prefix stripped;
`full=True` (`--rootfs`) extracts everything as-is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError, RegistryError
from kaito.image_builder.oci.extract import decompressed, extract_tar, verified, write_raw
from kaito.image_builder.oci.image import Image
from kaito.image_builder.oci.progress import NULL, Progress
from kaito.image_builder.transfer import Connection, RefLike, as_ref, read_image
from kaito.presets.errors import InvalidInput

MARKER = ".kaito-pull.json"
TAR_TYPES = (
    V.OCI_LAYER,
    V.OCI_LAYER_GZIP,
    V.OCI_LAYER_ZSTD,
    V.DOCKER_LAYER,
    V.DOCKER_LAYER_GZIP,
    V.MODEL_WEIGHT_TAR,
    V.MODEL_WEIGHT_CONFIG_TAR,
    "application/vnd.cncf.model.doc.v1.tar",
    "application/vnd.cncf.model.code.v1.tar",
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
        rel = Path(dirpath).relative_to(layer_dir)
        target_dir = tree / rel
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in sorted(filenames + links):
            src, dst = Path(dirpath) / name, target_dir / name
            if name == ".wh..wh..opq":
                for child in target_dir.iterdir() if target_dir.is_dir() else []:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                continue
            if name.startswith(".wh."):
                victim = target_dir / name[4:]
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                elif os.path.lexists(victim):
                    victim.unlink()
                continue
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            if not keep:
                os.replace(src, dst)
            elif src.is_symlink():
                if os.path.lexists(dst):
                    dst.unlink()
                os.symlink(os.readlink(src), dst)
            else:
                tmp = dst.with_name(f".{dst.name}.kaito-link")
                if os.path.lexists(tmp):
                    tmp.unlink()
                os.link(src, tmp)
                os.replace(tmp, dst)
        for d in dirnames:
            t = target_dir / d
            if os.path.lexists(t) and (t.is_symlink() or not t.is_dir()):
                t.unlink()
            t.mkdir(exist_ok=True)


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
) -> PullResult:
    """Pull `ref` into `dest` (see the module docstring); rerunning a finished pull is a no-op."""
    ref = as_ref(ref)
    dest = Path(dest)
    own = conn is None
    conn = conn or Connection(auth_file, insecure)
    try:
        img = read_image(ref, conn)
        digest = img.digest
        marker = dest / MARKER
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())
            except ValueError:
                done = {}
            if done.get("digest") == digest and done.get("full", False) == full:
                return PullResult(str(ref), digest, dest, _files(dest), 0, len(img.layers), True)
        layers, strip = _content_layers(img, full)
        for x in layers:
            if x.media_type not in TAR_TYPES and not _raw_name(x, img):
                raise OCIError(
                    f"pulling {ref}: layer {x.digest} has media type {x.media_type!r}: not a tar layer, and no "
                    f"file name annotation ({V.ANN_TITLE} or {V.MODEL_FILEPATH}) to store it under"
                )
        into_existing = dest.is_dir() and all(p.name in (".kaito-partial", MARKER) for p in dest.iterdir())
        if dest.exists() and not into_existing and not overwrite:
            raise InvalidInput(f"pull destination {dest} exists and is not empty; remove it or pass --force")
        staging = (dest / ".kaito-partial") if into_existing else dest.parent / f".{dest.name}.kaito-partial"
        state = staging / "state.json"
        if staging.exists():
            try:
                same = json.loads(state.read_text()).get("digest") == digest
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(staging)
        (staging / "layers").mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"ref": str(ref), "digest": digest}))
        downloaded = [0]

        def fetch_once(x, ldir: Path) -> None:
            if ldir.exists():
                shutil.rmtree(ldir)
            ldir.mkdir()
            name = x.annotations.get(V.MODEL_FILEPATH) or x.digest[7:19]
            adv = progress.task(x.digest, f"pull {name}", x.size)

            def count(n: int) -> None:
                downloaded[0] += n
                adv(n)

            stream = verified(x.open(), x.digest, x.size, f"layer {x.digest} of {ref}", count)
            raw = _raw_name(x, img)
            if raw:
                write_raw(stream, ldir, raw, f"layer {x.digest} of {ref}")
                return
            extract_tar(
                decompressed(stream, x.media_type),
                ldir,
                f"layer {x.digest} of {ref}",
                strip=strip,
                allow_absolute_links=full,
            )

        def fetch(x) -> None:
            hex_ = x.digest.split(":", 1)[1]
            ldir, done = staging / "layers" / hex_, staging / "layers" / f"{hex_}.done"
            if done.exists():
                progress.finish(x.digest, "verified earlier")
                return
            for attempt in range(retries + 1):
                try:
                    fetch_once(x, ldir)
                    break
                except RegistryError as e:
                    # A dropped connection or 5xx mid-layer: fetch that layer again (others keep their work).
                    if attempt == retries or (e.status is not None and e.status < 500):
                        raise
                    time.sleep(0.5 * 2**attempt)
            done.touch()
            progress.finish(x.digest, "done")

        # An image may list one layer twice (two empty layers, say): fetch it once, apply it at each place.
        unique = list({x.digest: x for x in layers}.values())
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="kaito-pull") as ex:
            futures = [ex.submit(fetch, x) for x in unique]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            # A bad layer (tampered, unsafe) poisons the whole pull: drop everything staged.
            # (a network failure keeps verified layers for the rerun)
            if not isinstance(errors[0], RegistryError):
                shutil.rmtree(staging, ignore_errors=True)
            raise errors[0]
        tree = staging / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir()
        for i, x in enumerate(layers):
            again = any(y.digest == x.digest for y in layers[i + 1:])
            _merge(staging / "layers" / x.digest.split(":", 1)[1], tree, keep=again)
        root = tree if (full or strip or V.ANN_CONTENT_ROOT in img.annotations) else _guess_root(tree)
        files = _files(root)
        (root / MARKER).write_text(json.dumps({"ref": str(ref), "digest": digest, "full": full, "files": list(files)}))
        if into_existing:
            for p in sorted(root.iterdir(), key=lambda p: p.name == MARKER):  # marker last
                os.replace(p, dest / p.name)
            shutil.rmtree(staging)
        else:
            if dest.exists():
                old = dest.parent / f".{dest.name}.kaito-old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(root, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(root, dest)
            shutil.rmtree(staging)
        return PullResult(str(ref), digest, dest, files, downloaded[0], len(layers))
    finally:
        if own:
            conn.close()
