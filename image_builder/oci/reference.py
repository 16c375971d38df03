"""Image references: registry refs `host[:port]/repo[:tag|@digest]` and layout refs `oci:PATH[:TAG|@digest]`.

Used by every entry point (build, pull, inspect, CLI), and by tuning (`--push`)
and the operator's admission to check an image name before any work. The layout syntax is
skopeo's `oci:` transport, so the same string works with skopeo. A "registry"
argument that is a filesystem path (or `oci:PATH`) names a directory of
layouts: image `kaito-<preset>` lives in `<dir>/kaito-<preset>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from kaito.image_builder.oci.errors import BadReference
from kaito.presets.images import digest_problem, image_name

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


@dataclass(frozen=True)
class Reference:
    """Where an image lives: a registry repository or an OCI layout directory, plus a tag or digest."""

    registry: Optional[str] = None  # host[:port]; None for layouts
    repository: Optional[str] = None
    path: Optional[Path] = None  # layout directory
    tag: Optional[str] = None
    digest: Optional[str] = None
    daemon: Optional[str] = None  # docker-daemon:NAME[:TAG] (a source only)

    @property
    def is_layout(self) -> bool:
        return self.path is not None

    @property
    def target(self) -> str:
        """What to resolve: the digest when pinned, else the tag (default `latest`)."""
        return self.digest or self.tag or "latest"

    def registry_repository(self) -> tuple[str, str]:
        """(registry host, repository) of a registry reference; a layout or daemon reference has none."""
        if self.registry is None or self.repository is None:
            raise BadReference(f"{self}: not a registry reference (host/repository[:tag])")
        return self.registry, self.repository

    def with_tag(self, tag: str) -> "Reference":
        return replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        if self.daemon:
            return f"docker-daemon:{self.daemon}"
        if self.is_layout:
            base = f"oci:{self.path}"
            return base + (f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else "")
        base = f"{self.registry}/{self.repository}"
        if self.tag:
            base += f":{self.tag}"
        if self.digest:
            base += f"@{self.digest}"
        return base

    @property
    def context(self) -> str:
        """Repository (or layout) name without tag/digest, for messages and cross-repo mounts."""
        return f"oci:{self.path}" if self.is_layout else f"{self.registry}/{self.repository}"


def _split_target(s: str, field: str) -> tuple[str, Optional[str], Optional[str]]:
    digest = None
    if "@" in s:
        s, digest = s.rsplit("@", 1)
        if digest_problem(digest):
            raise BadReference(f"{field}: digest {digest_problem(digest)}")
    tag = None
    last = s.rsplit("/", 1)[-1]
    if ":" in last:
        s, tag = s.rsplit(":", 1)
        if not TAG_RE.match(tag):
            raise BadReference(f"{field}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    return s, tag, digest


def parse_reference(ref: str, field: str = "reference") -> Reference:
    """Parse `host[:port]/repo[:tag][@digest]` or `oci:PATH[:TAG]` (a bare existing directory is a layout too)."""
    if not ref or ref.strip() != ref:
        raise BadReference(f"{field}: empty or padded image reference {ref!r}")
    if ref.startswith("docker-daemon:"):
        name = ref[len("docker-daemon:") :]
        if not name:
            raise BadReference(f"{field}: {ref!r} names no image; use docker-daemon:NAME[:TAG]")
        return Reference(daemon=name)
    if ref.startswith("oci:"):
        body = ref[4:]
        digest = tag = None
        if "@" in body:
            body, digest = body.rsplit("@", 1)
            if digest_problem(digest):
                raise BadReference(f"{field}: digest {digest_problem(digest)}")
        elif ":" in body.rsplit("/", 1)[-1]:
            body, tag = body.rsplit(":", 1)
        if not body:
            raise BadReference(f"{field}: {ref!r} names no layout directory; use oci:PATH[:TAG]")
        return Reference(path=Path(body), tag=tag, digest=digest)
    if ref.startswith(("/", "./", "../")) or Path(ref).is_dir():
        return Reference(path=Path(ref))
    name, tag, digest = _split_target(ref, field)
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        # Docker Hub shorthand, as docker and skopeo read it.
        first, rest = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    if not REPO_RE.match(rest):
        raise BadReference(
            f"{field}: repository {rest!r} in {ref!r} must be lowercase letters, digits and separators (. _ - /)"
        )
    return Reference(registry=first, repository=rest, tag=tag, digest=digest)


def is_path_like(registry: str) -> bool:
    """True when a REGISTRY argument names a directory (layout registry) rather than a host.

    A registry argument always starts with a host (`docker.io/me`, `127.0.0.1:5000`,
    `localhost/x`), so anything whose first component cannot be a host is a path (`out/registry`).
    """
    if registry.startswith(("oci:", "/", "./", "../", "~")) or Path(registry).is_dir():
        return True
    first = registry.split("/", 1)[0]
    return not ("." in first or ":" in first or first == "localhost")


def image_ref_for(registry: str, name: str, tag: str) -> Reference:
    """`<registry>/<name>:<tag>`, where a path registry means the layout `<dir>/<name>` with that tag."""
    if is_path_like(registry):
        d = Path(registry[4:] if registry.startswith("oci:") else registry).expanduser()
        return Reference(path=d / name, tag=tag)
    return parse_reference(image_name(registry, name, tag), "registry")
