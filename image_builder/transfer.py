"""Reading images from, and writing them to, any reference: OCI layouts or registries; inspect and copy.

The glue between references and the oci sources/sinks; called by build,
pull, the CLI and other packages (through kaito.image_builder's public face).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError
from kaito.image_builder.oci.image import Image, validate
from kaito.image_builder.oci.layout import Layout, image_from_manifest
from kaito.image_builder.oci.progress import NULL, Progress
from kaito.image_builder.oci.push import DEFAULT_CHUNK, Pusher
from kaito.image_builder.oci.reference import Reference, parse_reference
from kaito.image_builder.oci.remote import Registry, RemoteRepo

RefLike = Union[str, Reference]


def as_ref(ref: RefLike, field_name: str = "reference") -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(str(ref), field_name)


@dataclass
class Connection:
    """Options for reaching registries (auth file, --insecure); registries are opened once per host."""

    auth_file: Optional[Union[str, Path]] = None
    insecure: Optional[bool] = None
    _open: dict = field(default_factory=dict)

    def registry(self, host: str) -> Registry:
        if host not in self._open:
            self._open[host] = Registry(host, insecure=self.insecure, auth_file=self.auth_file)
        return self._open[host]

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def connection(
    conn: Optional[Connection], auth_file: Optional[Union[str, Path]] = None, insecure: Optional[bool] = None
) -> Iterator[Connection]:
    """`conn` when the caller lends one (left open), else a new Connection closed on the way out."""
    if conn is not None:
        yield conn
        return
    with Connection(auth_file, insecure) as own:
        yield own


def read_image(ref: RefLike, conn: Connection) -> Image:
    """The image at `ref`: a registry, an OCI layout, or a docker daemon (`docker-daemon:`, a source only).

    A registry index resolves to linux on this machine's architecture (`values.pick_platform`).
    The manifest and config are read now; layer bytes stream from the source when the image is
    written. Called by `copy`, `inspect`, `kaito.image_builder.build` (the base image, and
    `resolve_base` probing for one) and `kaito.image_builder.pull`.
    """
    ref = as_ref(ref)
    if ref.daemon:
        from kaito.image_builder.oci.daemon import read_daemon_image

        return read_daemon_image(ref.daemon)
    if ref.path is not None:
        return Layout(ref.path).read_image(ref.digest or ref.tag)
    host, repository = ref.registry_repository()
    reg = conn.registry(host)
    raw, mt = reg.get_manifest(repository, ref.target)
    m = V.parse_manifest(raw, mt)
    if isinstance(m, V.Index):
        desc = V.pick_platform(m)
        raw, mt = reg.get_manifest(repository, desc.digest)
        m = V.parse_manifest(raw, mt)
        if isinstance(m, V.Index):
            raise OCIError(f"reading {ref}: the index entry {desc.digest} is itself an index; name an image manifest")
    src = RemoteRepo(reg, repository)
    cfg = b"".join(src.open_blob(m.config.digest, m.config.size))
    return image_from_manifest(m, cfg, src)


@dataclass(frozen=True)
class PushResult:
    """Where an image went and what it cost: `bytes_uploaded` is what crossed the wire (or was written)."""

    ref: str
    digest: str
    size: int
    bytes_uploaded: int
    uploaded: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    mounted: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()

    @property
    def pinned(self) -> str:
        return f"{self.ref.split('@')[0]}@{self.digest}"


def write_image(
    image: Image,
    ref: RefLike,
    conn: Connection,
    *,
    jobs: int = 4,
    progress: Progress = NULL,
    chunk_size: int = DEFAULT_CHUNK,
    rate_limit: Optional[float] = None,
) -> PushResult:
    """Write `image` at `ref`: blobs first (skipping what exists), the manifest last."""
    ref = as_ref(ref, "destination")
    validate(image)
    if ref.digest:
        raise OCIError(f"writing {ref}: a destination takes a tag, not a digest")
    if ref.daemon:
        raise OCIError(f"writing {ref}: a docker daemon is a source only; push to a registry or oci:DIR")
    if ref.path is not None:
        return _write_layout(image, ref.path, ref, progress)
    host, repository = ref.registry_repository()
    pusher = Pusher(
        conn.registry(host),
        repository,
        jobs=jobs,
        chunk_size=chunk_size,
        rate_limit=rate_limit,
        progress=progress,
    )
    digest = pusher.push_image(image, ref.tag or "latest")
    s = pusher.stats
    return PushResult(
        str(ref.with_tag(ref.tag or "latest")),
        digest,
        image.size,
        s.bytes_uploaded,
        tuple(s.uploaded),
        tuple(s.skipped),
        tuple(s.mounted),
        tuple(s.resumed),
    )


def _write_layout(image: Image, path: Path, ref: Reference, progress: Progress) -> PushResult:
    """Write `image` into the OCI layout directory `path` (the one `ref` names), one progress task per blob."""

    def task(b):
        return progress.task(b.digest, f"write {b.annotations.get(V.MODEL_FILEPATH, b.digest[7:19])}", b.size)

    written = Layout(path).write_image(image, ref.tag or "latest", task)
    return PushResult(str(ref.with_tag(ref.tag or "latest")), image.digest, image.size, written)


def copy(src: RefLike, dst: RefLike, conn: Connection, **kw) -> PushResult:
    """Copy an image (manifest bytes unchanged, so the digest is kept) between layouts and registries."""
    return write_image(read_image(src, conn), dst, conn, **kw)


def inspect(ref: RefLike, conn: Optional[Connection] = None) -> dict:
    """Manifest facts: digest, media types, annotations, config summary and layers."""
    ref = as_ref(ref)
    with connection(conn) as c:
        img = read_image(ref, c)
    cfg = img.config if img.config_media_type in (V.OCI_CONFIG, V.DOCKER_CONFIG, V.MODEL_CONFIG) else {}
    return {
        "ref": str(ref),
        "digest": img.digest,
        "mediaType": img.media_type,
        "artifactType": img.artifact_type,
        "annotations": dict(img.annotations),
        "labels": (cfg.get("config") or {}).get("Labels") or {} if isinstance(cfg.get("config"), dict) else {},
        "config": {
            "mediaType": img.config_media_type,
            "digest": img.config_blob.digest,
            "size": len(img.config_bytes),
        },
        "size": img.size,
        "layers": [
            {"digest": x.digest, "size": x.size, "mediaType": x.media_type, "annotations": dict(x.annotations)}
            for x in img.layers
        ],
    }
