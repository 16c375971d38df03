"""OCI value types: media types, descriptors and manifest/index (de)serialisation.

Pure data, no I/O. Read by image, layout, remote and the pull/inspect code.
Docker schema2 manifests and manifest lists are read as their OCI twins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kaito.image_builder.oci.errors import OCIError, VerificationError
from kaito.presets.images import DIGEST_RE, digest_problem, is_digest  # noqa: F401  (one home for the rule)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

# CNCF ModelPack (github.com/modelpack/model-spec)
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
MODEL_WEIGHT_CONFIG_TAR = "application/vnd.cncf.model.weight.config.v1.tar"
MODEL_DOC_TAR = "application/vnd.cncf.model.doc.v1.tar"
MODEL_CODE_TAR = "application/vnd.cncf.model.code.v1.tar"
MODEL_FILEPATH = "org.cncf.model.filepath"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

# Kaito annotations
ANN_MODEL_NAME = "sh.kaito.model.name"  # Kaito's adapter contract
ANN_CONTENT_ROOT = "sh.kaito.content.root"  # the directory a plain pull strips (data, workspace/weights)
ANN_TITLE = "org.opencontainers.image.title"
ANN_REF_NAME = "org.opencontainers.image.ref.name"


def check_digest(digest: object, what: str) -> str:
    """`digest` if it follows the OCI digest grammar (kaito.presets.images), else OCIError naming `what`.

    Called where a digest enters from outside (descriptors, layouts) so no crafted
    value such as `sha256:../../x` ever becomes a path or a URL.
    """
    problem = digest_problem(digest)
    if problem:
        raise OCIError(f"{what}: digest {problem}")
    return digest  # type: ignore[return-value]


def new_hash(digest: str):
    """A fresh hashlib object for `digest`'s (already checked) algorithm."""
    return hashlib.new(digest.partition(":")[0])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: same value, same bytes, same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: Optional[str] = None
    platform: Optional[Mapping[str, str]] = None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.platform:
            d["platform"] = dict(self.platform)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Descriptor":
        if not isinstance(d, Mapping):
            raise OCIError(f"reading a descriptor: expected a JSON object, got {d!r:.200}")
        try:
            size = d["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"size {size!r} is not a non-negative integer")
            return cls(
                media_type=d["mediaType"],
                digest=check_digest(d["digest"], "reading a descriptor"),
                size=size,
                annotations=dict(d.get("annotations") or {}),
                artifact_type=d.get("artifactType"),
                platform=d.get("platform"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise OCIError(f"reading a descriptor: missing or bad field {e} in {dict(d)!r:.300}") from None


@dataclass(frozen=True)
class Manifest:
    """A parsed image manifest (OCI or Docker schema2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    artifact_type: Optional[str]
    raw: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    raw: bytes


def parse_manifest(raw: bytes, media_type: Optional[str] = None) -> "Manifest | Index":
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise OCIError(f"reading a manifest: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise OCIError(f"reading a manifest: expected a JSON object, got {type(d).__name__}")
    for key in ("manifests", "layers"):
        if not isinstance(d.get(key, []), list):
            raise OCIError(f"reading a manifest: {key!r} is not a list")
    mt = d.get("mediaType") or media_type or (OCI_INDEX if "manifests" in d else OCI_MANIFEST)
    if mt in INDEX_TYPES or "manifests" in d:
        return Index(mt, tuple(Descriptor.from_json(m) for m in d.get("manifests", [])), raw)
    if mt not in MANIFEST_TYPES:
        raise OCIError(f"reading a manifest: unsupported media type {mt!r} (expected one of {ACCEPT})")
    if "config" not in d:
        raise OCIError("reading a manifest: it has no config descriptor")
    return Manifest(
        media_type=mt,
        config=Descriptor.from_json(d["config"]),
        layers=tuple(Descriptor.from_json(x) for x in d.get("layers", [])),
        annotations=dict(d.get("annotations") or {}),
        artifact_type=d.get("artifactType"),
        raw=raw,
    )


def host_arch() -> str:
    """This machine's architecture in OCI terms."""
    import platform

    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}.get(m, m)


def pick_platform(index: Index, os_: str = "linux", arch: Optional[str] = None) -> Descriptor:
    """The index entry for os/arch (default: this machine's; first manifest when none declares a platform)."""
    arch = arch or host_arch()
    for m in index.manifests:
        p = m.platform or {}
        if p.get("os") == os_ and p.get("architecture") == arch:
            return m
    for m in index.manifests:
        if not m.platform and m.media_type in MANIFEST_TYPES:
            return m
    have = [f"{(m.platform or {}).get('os')}/{(m.platform or {}).get('architecture')}" for m in index.manifests]
    raise OCIError(f"selecting a platform: no {os_}/{arch} image in the index (it has {', '.join(have) or 'none'})")


def verify_bytes(data: bytes, digest: str, what: str) -> bytes:
    check_digest(digest, f"verifying {what}")
    h = new_hash(digest)
    h.update(data)
    got = f"{h.name}:{h.hexdigest()}"
    if got != digest:
        raise VerificationError(f"verifying {what}: content has digest {got}, expected {digest}")
    return data
