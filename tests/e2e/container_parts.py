"""Parts of the container end-to-end run (tests/e2e/container.py): our own dockerd, the cached
Debian root filesystem and wheelhouse, the build context, registry manifests, command running.

Only container.py imports this. Nothing here touches host network settings or the default
docker socket; every artifact it caches is keyed by what produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomllib
from kaito.image_builder.build import LOCAL_LAYOUT

REPO = Path(__file__).resolve().parents[2]

PRESET = "tiny-phi-3"
TAG = "e2e"
# Where `make build-base` stores the base and `make build-preset` writes (the Makefile's REGISTRY),
# relative to the repo (container.py runs there, as make does).
DEFAULT_LAYOUT = LOCAL_LAYOUT
IMPORTED = "kaito-e2e/debian:bookworm"
LOCAL_BASE = "kaito-e2e/base:e2e"
PROMPT = "What is Kubernetes?"
TORCH_WHEEL_DIRS = [Path("/opt/wheels")]
# gcc + libc6-dev: Dockerfiles/base's build stage (python:3.11 in production, which has them) prebuilds the CPU
# decode glue; the runtime stage here is the same Debian, so the glue check hides the compiler (PATH) to load the
# prebuilt library as the slim production image, which has none, does.
DEBIAN_PACKAGES = ["python3", "python3-venv", "ca-certificates", "gcc", "libc6-dev"]
# The Dockerfile expects a python:3.11-slim-like base: `python` and `pip` on PATH, installs
# allowed. Debian's own Python refuses pip installs (PEP 668), so the rootfs carries a venv
# that the imported image puts first on PATH.
ROOTFS_HOOK = 'chroot "$1" python3 -m venv /opt/venv'
IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


class StepFailed(Exception):
    """The first failure: a message saying which step, what was run and what it printed."""


@dataclass
class Run:
    """State shared by the steps, and what the report prints."""

    cache: Path
    work: Path
    keep: bool
    env: dict = field(default_factory=dict)
    timings: list = field(default_factory=list)  # (step, seconds, note)
    sizes: list = field(default_factory=list)  # (what, bytes, note)
    dockerd: subprocess.Popen | None = None
    registry: object | None = None  # support.registry.RegistryServer
    containers: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    current: str = "setup"
    dockerfile: Path = REPO / "Dockerfiles" / "base"
    build_args: dict = field(default_factory=dict)
    layout: str = DEFAULT_LAYOUT  # make's REGISTRY: where the base is stored (a layout dir, relative to the repo)
    base_only: bool = False  # `make build-base`: stop once the base is stored


def log(msg: str) -> None:
    print(msg, flush=True)


# Lines of long commands echoed as progress (the rest goes to the step's log file).
PROGRESS = re.compile(r"^(Step \d+/\d+ :|I: (running|downloading|extracting|installing|creating)|"
                      r"[0-9a-f]{12}: (Pushed|Pull complete|Mounted)|\S+: digest:|Successfully (built|tagged)|"
                      r"\s*Downloading|Saved|built |  uploaded)")


def sh(run: Run, cmd: list[str], *, timeout: float = 900, logname: str | None = None,
       check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
    """Run a command; long ones (logname) stream to a log file, echoing their progress lines."""
    if show:
        log("    $ " + shown(cmd))
    env = {**os.environ, **run.env}
    if logname:
        path = run.work / f"{logname}.log"
        with open(path, "w") as out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env, text=True, errors="replace") as child:
            watchdog = threading.Timer(timeout, child.kill)  # a silent, hung command still ends
            watchdog.start()
            try:
                for line in child.stdout:
                    out.write(line)
                    if PROGRESS.match(line):
                        log("      " + line.rstrip()[:150])
                child.wait()
            except BaseException:  # interrupted: stop the command now, not when it would finish
                child.kill()
                raise
            finally:
                watchdog.cancel()
        if child.returncode == -signal.SIGKILL:
            raise StepFailed(f"`{shown(cmd)}` did not finish within {timeout:.0f} s")
        proc = subprocess.CompletedProcess(cmd, child.returncode, path.read_text(errors="replace"))
    else:
        try:
            proc = subprocess.run(cmd, capture_output=True, env=env, timeout=timeout, text=True, check=False)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"`{shown(cmd)}` did not finish within {timeout:.0f} s") from None
        proc.stdout = (proc.stdout or "") + (proc.stderr or "")
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-40:])
        raise StepFailed(f"`{shown(cmd)}` exited {proc.returncode}:\n{tail}")
    return proc


def shown(cmd: list[str]) -> str:
    """A command as printed: inline scripts and the long --platform list abbreviated."""
    words, seen_platform = [], False
    for i, word in enumerate(cmd):
        if word == "--platform" or (i and cmd[i - 1] == "--platform"):
            if not seen_platform and word == "--platform":
                words.append("--platform <manylinux_2_36..manylinux1 x86_64>")
                seen_platform = True
            continue
        words.append(word if len(word) < 160 and "\n" not in word else f"<{len(word)}-char script>")
    return " ".join(words)


def docker(run: Run, *args: str, **kw) -> subprocess.CompletedProcess:
    return sh(run, ["docker", *args], **kw)


def digest_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- daemon


def start_dockerd(run: Run) -> str:
    """Our own daemon: private data/exec roots and socket; no bridge, no iptables, no forwarding."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise StepFailed("dockerd/docker not found: install Debian's docker.io (and a docker CLI)")
    sock = run.work / "docker.sock"
    cmd = ["dockerd", "--data-root", str(run.work / "docker"), "--exec-root", str(run.work / "exec"),
           "-H", f"unix://{sock}", "--pidfile", str(run.work / "docker.pid"),
           "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
    log("    $ " + shown(cmd))
    with open(run.work / "dockerd.log", "w") as out:  # the daemon keeps its own copy of the descriptor
        run.dockerd = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # The CLI must never fall back to the default socket or the user's ~/.docker; the legacy
    # builder is what a CLI without the buildx plugin has, so ask for it explicitly.
    run.env.update(DOCKER_HOST=f"unix://{sock}", DOCKER_CONFIG=str(run.work / "docker-config"),
                   DOCKER_BUILDKIT="0", DOCKER_CLI_HINTS="false")
    (run.work / "docker-config").mkdir(exist_ok=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if run.dockerd.poll() is not None:
            raise StepFailed(f"dockerd exited {run.dockerd.returncode}:\n{tail_of(run.work / 'dockerd.log')}")
        if sock.exists() and docker(run, "version", "--format", "{{.Server.Version}}", check=False, show=False).returncode == 0:
            return docker(run, "version", "--format", "{{.Server.Version}}", show=False).stdout.strip()
        time.sleep(0.3)
    raise StepFailed(f"dockerd did not answer on {sock} within 60 s:\n{tail_of(run.work / 'dockerd.log')}")


def stop_dockerd(run: Run) -> None:
    if run.dockerd is None or run.dockerd.poll() is not None:
        return
    run.dockerd.terminate()
    try:
        run.dockerd.wait(30)
    except subprocess.TimeoutExpired:
        run.dockerd.kill()
        run.dockerd.wait(10)


def tail_of(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- cached artifacts


def host_debian_sources() -> tuple[str, list[str]]:
    """The host's suite and its enabled Debian apt source files, so the rootfs comes from the same mirror."""
    suite = "bookworm"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            suite = line.split("=", 1)[1].strip().strip('"') or suite
    if os.environ.get("KAITO_E2E_DEBIAN_MIRROR"):
        return suite, [os.environ["KAITO_E2E_DEBIAN_MIRROR"]]
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    chosen = [str(p) for p in files if p.is_file() and p.suffix in (".list", ".sources")
              and "debian" in p.read_text() and any(
                  ln.strip() and not ln.lstrip().startswith("#") for ln in p.read_text().splitlines())]
    return suite, chosen or ["http://deb.debian.org/debian"]


def make_rootfs(run: Run) -> tuple[Path, bool]:
    suite, mirrors = host_debian_sources()
    key = digest_of(suite, DEBIAN_PACKAGES, ROOTFS_HOOK, [(m, Path(m).read_text() if Path(m).is_file() else m) for m in mirrors])
    tarball = run.cache / f"rootfs-{suite}-{key}.tar"
    if tarball.exists():
        return tarball, True
    partial = tarball.with_suffix(".partial.tar")
    partial.unlink(missing_ok=True)
    sh(run, ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
             "--customize-hook=" + ROOTFS_HOOK, "--format=tar", suite, str(partial), *mirrors], logname="mmdebstrap", timeout=1200)
    partial.rename(tarball)  # only a complete tarball is ever cached
    return tarball, False


# The base image serves and tunes: the operator runs the tuning Job on the preset image, so
# Dockerfiles/base installs kaito[runtime,tuning] and the wheelhouse must hold both extras.
IMAGE_EXTRAS = ("runtime", "tuning")


def image_requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [req for name in IMAGE_EXTRAS for req in meta["optional-dependencies"][name]]
    return list(dict.fromkeys([*meta["dependencies"], *extras]))


def torch_wheel() -> Path:
    for d in TORCH_WHEEL_DIRS:
        found = sorted(d.glob("torch-*+cpu-cp311-*linux*_x86_64.whl"))
        if found:
            return found[-1]
    raise StepFailed("no local torch CPU wheel for cp311 in " + ", ".join(map(str, TORCH_WHEEL_DIRS)))


# The image's Python: Debian bookworm's CPython 3.11 on glibc 2.36. pip does not widen a
# --platform to the older manylinux tags that glibc also runs, so every one is listed.
PLATFORM_ARGS = ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311",
                 *(a for minor in range(36, 4, -1) for a in ("--platform", f"manylinux_2_{minor}_x86_64")),
                 *(a for tag in ("manylinux2014", "manylinux2010", "manylinux1") for a in ("--platform", f"{tag}_x86_64"))]


def make_wheelhouse(run: Run) -> tuple[Path, bool]:
    """kaito[runtime,tuning] dependencies for the image's Python 3.11 (cached), whatever Python runs this script."""
    torch = torch_wheel()
    key = digest_of(image_requirements(), torch.name, PLATFORM_ARGS)
    house = run.cache / f"wheelhouse-{key}"
    if (house / ".complete").exists():
        return house, True
    house.mkdir(parents=True, exist_ok=True)  # pip skips wheels already there: a rerun resumes
    shutil.copy2(torch, house / torch.name)
    reqs = [r for r in image_requirements() if not r.startswith("torch")]
    sh(run, [sys.executable, "-m", "pip", "download", "-q", "-d", str(house), *PLATFORM_ARGS,
             "--find-links", str(house), str(house / torch.name), *reqs], logname="pip-download", timeout=1800)
    (house / ".complete").write_text(json.dumps(sorted(p.name for p in house.glob("*.whl"))))
    return house, False


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def image_size(run: Run, ref: str) -> int:
    return int(docker(run, "image", "inspect", "--format", "{{.Size}}", ref, show=False).stdout.strip())


# ---------------------------------------------------------------- registry


def manifest(ref: str) -> dict:
    """A manifest as the registry serves it (the loopback registry is anonymous)."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    resp = httpx.get(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    if resp.status_code != 200:
        raise StepFailed(f"registry has no manifest for {ref}: HTTP {resp.status_code} {resp.text[:300]}")
    return resp.json()


def pushed_size(m: dict) -> int:
    return m["config"]["size"] + sum(layer["size"] for layer in m["layers"])


def from_args(dockerfile: str) -> list[str]:
    """Build args a Dockerfile's FROM lines read (`FROM ${BASE_IMAGE} AS x`): each gets the imported image."""
    names = []
    for line in dockerfile.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            names += re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", words[1])
    return names


def copy_sources(dockerfile: str) -> list[str]:
    """Context paths a Dockerfile's COPY/ADD lines read (not --from stages), globs included."""
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0].upper() in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def make_context(run: Run, dockerfile: str, wheelhouse: Path) -> Path:
    """Only what the Dockerfile copies, plus wheelhouse/: the repo's .venv and out/ never reach the daemon."""
    context = run.work / "base-context"
    context.mkdir()
    for pattern in copy_sources(dockerfile):
        for src in REPO.glob(pattern):
            dest = context / src.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
            else:
                shutil.copy2(src, dest)
    wheels = context / "wheelhouse"
    wheels.mkdir(exist_ok=True)
    for whl in wheelhouse.glob("*.whl"):
        try:
            os.link(whl, wheels / whl.name)
        except OSError:  # cache on another filesystem
            shutil.copy2(whl, wheels / whl.name)
    return context
