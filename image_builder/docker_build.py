"""Building the Dockerfiles/ images with a docker daemon (docker SDK): `kaito image build-base` and the docker tests.

Optional: only used when a daemon is reachable (never the default socket
unless the user points DOCKER_HOST at it). The build context is sent as a tar
we compose (context directory + the chosen Dockerfile), so a Dockerfile from
Dockerfiles/ can build any directory, e.g. an adapter FROM scratch.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Optional, Union

from kaito.presets.errors import InvalidInput, KaitoError

DOCKERFILES = Path(__file__).resolve().parent.parent / "Dockerfiles"
PROJECT_ROOT = DOCKERFILES.parent


def dockerfile_path(name: str) -> Path:
    p = DOCKERFILES / name
    if not p.is_file():
        have = ", ".join(sorted(x.name for x in DOCKERFILES.iterdir())) if DOCKERFILES.is_dir() else "none"
        raise InvalidInput(f"--dockerfile {name!r}: no Dockerfiles/{name} (have: {have})")
    return p


def _context(context_dir: Path, dockerfile: Path) -> io.BytesIO:
    buf = io.BytesIO()
    skip = {".git", ".venv", "out", "__pycache__", ".pytest_cache", "kaito.egg-info"}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(context_dir.rglob("*")):
            rel = p.relative_to(context_dir)
            if skip & set(rel.parts) or not p.is_file():
                continue
            tar.add(p, str(rel), recursive=False)
        data = dockerfile.read_bytes()
        ti = tarfile.TarInfo("Dockerfile.kaito")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    buf.seek(0)
    return buf


def _client(name: str, docker_host: Optional[str]):
    """A docker client that answered a ping, or a KaitoError saying which daemon was tried."""
    import docker

    try:
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        client.ping()
    except Exception as e:
        raise KaitoError(
            f"building {name}: no docker daemon reachable at {docker_host or 'DOCKER_HOST'} ({type(e).__name__})"
        ) from None
    return client


def _push(client, ref: str) -> Optional[str]:
    """Push `ref` through the daemon; returns the digest the registry reported."""
    repo, _, tag = ref.rpartition(":")
    if "/" in tag:  # the colon was a registry port: no tag given
        repo, tag = ref, "latest"
    digest = None
    for line in client.images.push(repo, tag=tag, stream=True, decode=True):
        if "error" in line:
            raise KaitoError(f"pushing {ref} with docker: {line['error']}")
        digest = (line.get("aux") or {}).get("Digest") or digest
    return digest


def build_dockerfile(
    name: str,
    ref: str,
    *,
    context: Optional[Union[str, Path]] = None,
    docker_host: Optional[str] = None,
    buildargs: Optional[dict] = None,
    push: bool = True,
    labels: Optional[dict] = None,
    network_mode: Optional[str] = None,
) -> dict:
    """Build Dockerfiles/<name> over `context` (default: the project) as `ref`; push it when asked."""
    try:
        import docker
    except ImportError:
        raise KaitoError("building with docker needs the docker SDK: pip install 'kaito[docker]'") from None
    dockerfile = dockerfile_path(name)
    client = _client(name, docker_host)
    try:
        ctx = _context(Path(context) if context else PROJECT_ROOT, dockerfile)
        image, logs = client.images.build(
            fileobj=ctx,
            custom_context=True,
            dockerfile="Dockerfile.kaito",
            tag=ref,
            buildargs=buildargs or {},
            labels=labels or {},
            rm=True,
            pull=False,
            # "none" for daemons started without a bridge (the offline test daemon).
            network_mode=network_mode,
        )
        result = {"id": image.id, "ref": ref}
        if push:
            result["digest"] = _push(client, ref)
        return result
    except docker.errors.BuildError as e:
        tail = "".join(x.get("stream", "") for x in e.build_log if isinstance(x, dict))[-1500:]
        raise KaitoError(f"building Dockerfiles/{name}: {e.msg}\n{tail}") from None
    except docker.errors.APIError as e:
        raise KaitoError(f"building Dockerfiles/{name}: docker API error: {e.explanation or e}") from None
    finally:
        client.close()
