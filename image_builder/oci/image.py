"""Immutable `Image` values and the functional `append(base, layers, ...)`.

An Image is a config (bytes), a tuple of Layers and manifest annotations; its
manifest is deterministic JSON, so the same inputs give the same digest.
Nothing here does I/O: sources (layout, remote) produce Images, sinks write
them. Built by kaito.image_builder.build; read and written by layout, push,
daemon, transfer and pull.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.errors import OCIError
from kaito.image_builder.oci.layer import BlobSource, Layer

EPOCH = "1970-01-01T00:00:00Z"
_DOCKER_TO_OCI = {
    V.DOCKER_LAYER_GZIP: V.OCI_LAYER_GZIP,
    V.DOCKER_LAYER: V.OCI_LAYER,
    V.DOCKER_CONFIG: V.OCI_CONFIG,
    V.DOCKER_MANIFEST: V.OCI_MANIFEST,
}


@dataclass(frozen=True)
class Image:
    """An image or artifact manifest with its config and layers; never mutated, only derived."""

    config_bytes: bytes
    layers: tuple[Layer, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    config_media_type: str = V.OCI_CONFIG
    artifact_type: Optional[str] = None
    media_type: str = V.OCI_MANIFEST
    raw_manifest: Optional[bytes] = None  # as read from a source; kept so digests of pulled images match
    source: Optional[BlobSource] = None  # where it was read from: lets a push mount the config blob too

    @cached_property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_bytes)

    @property
    def config_blob(self) -> Layer:
        return replace(Layer.blob(self.config_bytes, self.config_media_type), source=self.source)

    @cached_property
    def manifest_bytes(self) -> bytes:
        if self.raw_manifest is not None:
            return self.raw_manifest
        m: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            m["artifactType"] = self.artifact_type
        m["config"] = self.config_blob.descriptor.to_json()
        m["layers"] = [layer.descriptor.to_json() for layer in self.layers]
        if self.annotations:
            m["annotations"] = dict(self.annotations)
        return V.canonical_json(m)

    @property
    def digest(self) -> str:
        return V.sha256_digest(self.manifest_bytes)

    @property
    def size(self) -> int:
        """Manifest + config + layers, in bytes."""
        return len(self.manifest_bytes) + len(self.config_bytes) + sum(x.size for x in self.layers)

    def blobs(self) -> tuple[Layer, ...]:
        return (self.config_blob, *self.layers)

    def derive(self, **changes: Any) -> "Image":
        """A new Image with fields changed (the manifest is recomputed)."""
        changes.setdefault("raw_manifest", None)
        return replace(self, **changes)


def empty_image(os: str = "linux", architecture: str = "amd64") -> Image:
    """The scratch image: no layers, an empty rootfs."""
    cfg = {
        "architecture": architecture,
        "os": os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }
    return Image(V.canonical_json(cfg))


def as_oci(image: Image) -> Image:
    """Docker schema2 images re-described with the equivalent OCI media types (same blobs, same bytes)."""
    if image.media_type == V.OCI_MANIFEST and image.config_media_type == V.OCI_CONFIG:
        return image
    layers = tuple(replace(x, media_type=_DOCKER_TO_OCI.get(x.media_type, x.media_type)) for x in image.layers)
    return image.derive(
        layers=layers,
        media_type=V.OCI_MANIFEST,
        config_media_type=_DOCKER_TO_OCI.get(image.config_media_type, image.config_media_type),
    )


def append(
    base: Image,
    layers: Iterable[Layer],
    *,
    env: Optional[Mapping[str, str]] = None,
    labels: Optional[Mapping[str, str]] = None,
    annotations: Optional[Mapping[str, str]] = None,
    workdir: Optional[str] = None,
    user: Optional[str] = None,
    cmd: Optional[list[str]] = None,
    entrypoint: Optional[list[str]] = None,
    created_by: str = "kaito image append",
) -> Image:
    """`base` plus `layers` and config changes, as a new Image (base is untouched, its layers reused by digest)."""
    layers = tuple(layers)
    base = as_oci(base)
    cfg = json.loads(base.config_bytes)
    _add_layers(cfg, layers, created_by)
    c = cfg.setdefault("config", {}) or {}
    cfg["config"] = c
    if env:
        keep = [e for e in c.get("Env") or [] if e.split("=", 1)[0] not in env]
        c["Env"] = keep + [f"{k}={v}" for k, v in env.items()]
    if labels:
        c["Labels"] = {**(c.get("Labels") or {}), **labels}
    settings = {"WorkingDir": workdir, "User": user, "Cmd": cmd, "Entrypoint": entrypoint}
    c.update({k: v for k, v in settings.items() if v is not None})
    return base.derive(
        config_bytes=V.canonical_json(cfg),
        layers=base.layers + layers,
        annotations={**base.annotations, **(annotations or {})},
    )


def _add_layers(cfg: dict, layers: tuple[Layer, ...], created_by: str) -> None:
    """Record `layers` in an image config: their diff ids, one history entry each, the fixed creation time."""
    rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [x.diff_id for x in layers]
    history = list(cfg.get("history") or [])
    for x in layers:
        history.append(
            {"created": EPOCH, "created_by": f"{created_by}: {x.annotations.get(V.MODEL_FILEPATH, x.digest[:19])}"}
        )
    cfg["history"] = history
    cfg.pop("created", None)
    cfg["created"] = EPOCH


def validate(image: Image) -> None:
    """Invariants of any image: diff ids match layers, descriptors well formed, artifacts typed."""
    for x in image.blobs():
        if not V.is_digest(x.digest) or x.size < 0:
            raise OCIError(f"validating image: bad descriptor {x.digest!r} size {x.size}")
    if image.config_media_type in (V.OCI_CONFIG, V.DOCKER_CONFIG):
        diff_ids = (image.config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(image.layers):
            raise OCIError(f"validating image: config lists {len(diff_ids)} diff ids for {len(image.layers)} layers")
        for x, d in zip(image.layers, diff_ids, strict=True):
            if x.diff_id != d and x.media_type in (V.OCI_LAYER, V.DOCKER_LAYER):
                raise OCIError(f"validating image: layer {x.digest} has diff id {x.diff_id}, config says {d}")
