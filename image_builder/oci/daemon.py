"""A docker daemon as an image source (`docker-daemon:NAME[:TAG]`, skopeo's syntax); optional, docker SDK.

The daemon's `docker save` archive is spooled to a temporary file once; each
layer is then a byte range of that file (uncompressed tar, so its digest is
its diff id), streamed like any other layer. Called by transfer.read_image.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError
from kaito.image_builder.oci.image import Image
from kaito.image_builder.oci.layer import FileRange, Layer

if TYPE_CHECKING:
    import docker
    import docker.models.images


def read_daemon_image(name: str, docker_host: Optional[str] = None) -> Image:
    """The image `name` from a docker daemon (DOCKER_HOST, or `docker_host`), as an OCI Image value."""
    try:
        import docker
    except ImportError:
        raise OCIError("reading from a docker daemon needs the docker SDK: pip install 'kaito[docker]'") from None
    host = docker_host or os.environ.get("DOCKER_HOST")
    try:
        client = docker.DockerClient(base_url=host) if host else docker.from_env()
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        raise OCIError(f"reading docker-daemon:{name}: the daemon has no such image") from None
    except Exception as e:
        raise OCIError(
            f"reading docker-daemon:{name}: no docker daemon reachable at {host or 'DOCKER_HOST'} ({type(e).__name__})"
        ) from None
    spool = _spool_save(client, image, name)
    try:
        img = _image_from_archive(spool, name)
    except BaseException:
        os.unlink(spool)
        raise
    # the spool lives as long as the Image value that streams from it
    weakref.finalize(img, os.unlink, spool)
    return img


def _spool_save(client: docker.DockerClient, image: docker.models.images.Image, name: str) -> Path:
    """`docker save` of `image` into a temporary file (removed again if the save fails); closes `client`."""
    import docker

    spool = tempfile.NamedTemporaryFile(prefix="kaito-docker-save-", suffix=".tar", delete=False)
    try:
        with spool:
            for chunk in image.save(chunk_size=1 << 20, named=False):
                spool.write(chunk)
    except BaseException as e:
        os.unlink(spool.name)
        if isinstance(e, docker.errors.DockerException):
            raise OCIError(f"reading docker-daemon:{name}: docker save failed: {e}") from None
        raise
    finally:
        client.close()
    return Path(spool.name)


def _image_from_archive(spool: Path, name: str) -> Image:
    """The Image in a `docker save` archive; each layer a byte range of the archive file."""
    with tarfile.open(spool) as t:
        members = {m.name: m for m in t.getmembers()}
        manifest = json.loads(_member_bytes(t, members, "manifest.json", name))[0]
        config = _member_bytes(t, members, manifest["Config"], name)
    layers = []
    for path in manifest["Layers"]:
        m = members.get(path)
        if m is None:
            raise OCIError(f"reading docker-daemon:{name}: the saved archive lacks {path}")
        seg = (FileRange(spool, m.offset_data, m.size),)
        layers.append(Layer.from_segments(seg, V.OCI_LAYER, cache=False))
    return Image(config_bytes=config, layers=tuple(layers), config_media_type=V.OCI_CONFIG)


def _member_bytes(t: tarfile.TarFile, members: dict[str, tarfile.TarInfo], path: str, name: str) -> bytes:
    m = members.get(path)
    f = t.extractfile(m) if m is not None else None
    if f is None:
        raise OCIError(f"reading docker-daemon:{name}: the saved archive lacks the file {path}")
    return f.read()
