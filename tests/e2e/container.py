"""Container end to end: the `Dockerfiles/base` runtime image really serves, fully offline.

Run by `make e2e-container` and by tests/e2e/test_container.py (markers docker, slow).
Needs root, dockerd, mmdebstrap and Debian's docker-registry; touches no host network
setting and no default docker socket. Steps:

  dockerd        our own daemon (--bridge=none, no iptables/forwarding/masquerade) on a private socket
  rootfs         a Debian minbase root filesystem from the host's own apt mirror (mmdebstrap; cached)
  wheelhouse     kaito[runtime,tuning] dependencies for cp311 + the local torch CPU wheel (cached)
  build-base     `docker import` of the rootfs (no hub is reachable), then `docker build --network none`
                 of Dockerfiles/base on it, pip offline; skipped when the layout already holds the base
                 built from this exact source tree, Dockerfile, wheelhouse and rootfs (or, to
                 iterate on tests only, whenever it holds one: KAITO_E2E_REUSE_BASE=1)
  registry       Debian's docker-registry with its own config on a free 127.0.0.1 port
  store-base     `docker push` of the base there, then `kaito image copy` into the layout
                 <layout>/kaito-base:<version> (default out/registry), digests unchanged: where
                 `make build-preset` finds it by default.    (`make build-base` stops here.)
  build-preset   `make build-preset MODEL=tiny-phi-3` as a user runs it (no --base, no
                 KAITO_BASE_IMAGE): the base's layers by digest, the weights appended
  push-preset    `kaito image copy` of exactly that image to the loopback registry
  pull           `docker pull` of it into the daemon
  serve          `docker run --network none` with the image's default command; the client runs inside
                 the container through `docker exec` (no bridge exists and we create none), waits for
                 /health and POSTs /chat.
  tuning-imports the tuning Job's entry point (`python -m kaito.tuning`, pyarrow, peft) in the image

Prints a table of step times and image sizes. Exits non-zero with a clear message at the first
failure; the daemon, registry and containers are always cleaned up. Expensive artifacts are cached
under $KAITO_E2E_CACHE (default out/e2e-cache).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from container_parts import (
    DEFAULT_LAYOUT,
    IMAGE_PATH,
    IMPORTED,
    LOCAL_BASE,
    PRESET,
    PROMPT,
    REPO,
    Run,
    StepFailed,
    dir_size,
    copy_sources,
    digest_of,
    docker,
    from_args,
    image_size,
    log,
    make_context,
    make_rootfs,
    make_wheelhouse,
    pushed_size,
    sh,
    start_dockerd,
    stop_dockerd,
)

sys.path.insert(0, str(REPO / "tests"))
from kaito.image_builder.oci.reference import image_ref_for
from kaito.presets.images import BASE_REPOSITORY, preset_image
from kaito.presets import __version__ as KAITO_VERSION
from kaito.presets.errors import KaitoError
from support.registry import start_registry


def build_base(run: Run, wheelhouse: Path) -> None:
    """docker build of Dockerfiles/base on the imported Debian, pip offline from the wheelhouse."""
    if not run.dockerfile.is_file():
        raise StepFailed(f"{run.dockerfile} does not exist yet (image builder issue, section 4)")
    text = run.dockerfile.read_text()
    declared = set(re.findall(r"(?m)^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", text))
    if not {"PIP_NO_INDEX", "PIP_FIND_LINKS"} <= declared:
        raise StepFailed(f"{run.dockerfile} cannot install offline: it must declare ARG PIP_NO_INDEX and "
                         "ARG PIP_FIND_LINKS and COPY wheelhouse* /wheels/ (see its offline-build comment)")
    context = make_context(run, text, wheelhouse)
    shutil.copy2(run.dockerfile, context / "Dockerfile")
    args = {name: IMPORTED for name in from_args(text)}
    args.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="/wheels")
    args.update(run.build_args)
    run.facts["build_args"] = args
    cmd = ["build", "--network", "none", "-t", LOCAL_BASE]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    docker(run, *cmd, str(context), logname="build-base", timeout=1800)
    uid = docker(run, "run", "--rm", "--network", "none", "--entrypoint", "id", LOCAL_BASE, "-u").stdout.strip()
    if uid == "0":
        raise StepFailed(f"{LOCAL_BASE} runs as root; Dockerfiles/base must switch to a non-root user")
    run.facts["base_uid"] = uid
    # The offline wheelhouse must stay in Dockerfiles/base's build stage: no layer of the image copies it.
    history = docker(run, "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", LOCAL_BASE, show=False).stdout
    wheels = [ln.split("\t")[0] for ln in history.splitlines() if "/wheels/" in ln]
    if wheels:
        raise StepFailed(f"{LOCAL_BASE} carries the wheelhouse as a layer ({', '.join(wheels)}); install it in a "
                         "build stage and copy only the installed result")


def build_preset(run: Run) -> str:
    """`make build-preset MODEL=tiny-phi-3` exactly as a user runs it: no --base, default registry."""
    env = {k: v for k, v in os.environ.items() if k not in ("KAITO_BASE_IMAGE", "REGISTRY", "TAG", "MODEL")}
    proc = subprocess.run(["make", "--no-print-directory", "build-preset", f"MODEL={PRESET}", f"REGISTRY={run.layout}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    (run.work / "build-preset.log").write_text(proc.stdout + proc.stderr)
    log(f"    $ make build-preset MODEL={PRESET}" + ("" if run.layout == DEFAULT_LAYOUT else f" REGISTRY={run.layout}"))
    if proc.returncode != 0:
        raise StepFailed(f"`make build-preset` exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2500:]}")
    built = re.search(r"built (\S+)@(sha256:[0-9a-f]{64}) \(on (\S+)\)", proc.stdout)
    if not built:
        raise StepFailed(f"`make build-preset` did not build on a base:\n{proc.stdout[-1500:]}")
    run.facts["build_preset"] = f"{built.group(1)}@{built.group(2)} on {built.group(3)}"
    if built.group(3) != run.facts["stored_base"]:
        raise StepFailed(f"make build-preset used {built.group(3)}, not the base make build-base stored "
                         f"({run.facts['stored_base']})")
    return built.group(1)


def kaito_cli() -> str:
    kaito = REPO / ".venv" / "bin" / "kaito"
    return str(kaito) if kaito.exists() else "kaito"


CLIENT = r"""
import json, sys, time, urllib.request, urllib.error
base = "http://127.0.0.1:5000"
deadline = time.monotonic() + float(sys.argv[1])
health = None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            health = json.load(r)
            if r.status == 200:
                break
    except (urllib.error.URLError, OSError, ValueError) as e:
        health = repr(e)
    time.sleep(0.5)
else:
    print(json.dumps({"error": "no healthy /health", "last": str(health)})); sys.exit(3)
t0 = time.monotonic()
req = urllib.request.Request(base + "/chat", data=json.dumps({"prompt": sys.argv[2]}).encode(),
                             headers={"Content-Type": "application/json"}, method="POST")
try:
    with urllib.request.urlopen(req, timeout=300) as r:
        body = json.load(r)
except urllib.error.HTTPError as e:
    print(json.dumps({"error": f"/chat HTTP {e.code}", "body": e.read().decode(errors="replace")[:2000]})); sys.exit(4)
print(json.dumps({"health": health, "chat": body, "chat_seconds": round(time.monotonic() - t0, 2)}))
"""


def serve_and_chat(run: Run, image: str) -> dict:
    config = json.loads(docker(run, "image", "inspect", image, show=False).stdout)[0]["Config"]
    run.facts["image_default_command"] = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    name = f"kaito-e2e-{os.getpid()}"
    # The preset image serves by default: its entrypoint is the runtime and its
    # KAITO_PRESET / KAITO_MODEL_DIR env name the preset and the baked weights.
    if config.get("Entrypoint") != ["python", "-m", "kaito.runtime"]:
        raise StepFailed(f"{image} does not start the runtime by default: {run.facts['image_default_command']}")
    run.facts["serve_command"] = "docker run (image default: python -m kaito.runtime)"
    docker(run, "run", "-d", "--name", name, "--network", "none", image)
    run.containers.append(name)
    listing = docker(run, "exec", name, "ls", "-la", "/workspace/weights").stdout
    if "safetensors" not in listing:
        raise StepFailed(f"/workspace/weights in {image} holds no safetensors:\n{listing}")
    uid = docker(run, "exec", name, "id", "-u", show=False).stdout.strip()
    if uid == "0":
        raise StepFailed(f"{image} serves as root")
    proc = docker(run, "exec", name, "python", "-c", CLIENT, "240", PROMPT, check=False, timeout=600)
    state = json.loads(docker(run, "inspect", name, show=False).stdout)[0]["State"]
    if proc.returncode != 0:
        logs = docker(run, "logs", "--tail", "40", name, check=False, show=False).stdout
        raise StepFailed(f"client in the container failed ({proc.stdout.strip()[-1500:]}); container "
                         f"running={state['Running']} exit={state['ExitCode']}; server log:\n{logs}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    chat = result["chat"]
    if not isinstance(chat, dict) or not isinstance(chat.get("Result"), str) or not chat["Result"]:
        raise StepFailed(f'/chat did not answer {{"Result": "<text>"}}: {chat!r}')
    if result["health"] != {"status": "Healthy"}:
        raise StepFailed(f'/health answered {result["health"]!r}, not {{"status": "Healthy"}}')
    return result


class Step:
    """`with Step(run, name) as st:` times a step, prints its progress and records it (st.note)."""

    def __init__(self, run: Run, name: str) -> None:
        self.run, self.name, self.note = run, name, ""

    def __enter__(self) -> Step:  # noqa: PYI034
        log(f"==> {self.name}")
        self.run.current = self.name
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            seconds = time.monotonic() - self.t0
            self.run.timings.append((self.name, seconds, self.note))
            log(f"    done in {seconds:.1f} s" + (f"  ({self.note})" if self.note else ""))


def base_steps(run: Run) -> None:
    """`make build-base`: Dockerfiles/base built offline, stored as <layout>/kaito-base:<version>.

    Holds the cache's lock throughout: `.ci/run` builds the base in the background while the other tests
    run, and a test needing it meanwhile waits here, then finds it cached instead of building it twice."""
    with Step(run, "dockerd"):
        run.facts["dockerd"] = start_dockerd(run)
    with base_lock(run.cache) as waited:
        if waited >= 1:
            run.timings.append(("base-lock", waited, "waited for another build of the base"))
        _base_steps_locked(run)


@contextlib.contextmanager
def base_lock(cache: Path) -> Iterator[float]:
    """An exclusive flock on <cache>/.base.lock (released when its holder exits, however it exits); yields
    the seconds spent waiting for it."""
    t0 = time.monotonic()
    with open(cache / ".base.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"    another build of the base holds {cache / '.base.lock'}: waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield time.monotonic() - t0


def _base_steps_locked(run: Run) -> None:
    with Step(run, "rootfs") as st:
        tarball, cached = make_rootfs(run)
        st.note = "cached" if cached else "mmdebstrap"
    run.sizes.append(("rootfs tarball", tarball.stat().st_size, tarball.name))
    with Step(run, "wheelhouse") as st:
        house, cached = make_wheelhouse(run)
        st.note = "cached" if cached else "pip download"
    run.sizes.append(("wheelhouse", dir_size(house), f"{len(list(house.glob('*.whl')))} wheels"))
    stored = str(image_ref_for(run.layout, BASE_REPOSITORY, KAITO_VERSION))  # build-preset's own default
    key = base_key(run, tarball, house)
    record = run.cache / f"base-{key}.json"
    with Step(run, "build-base") as st:
        if record.exists() and stored_digest(stored) == json.loads(record.read_text())["digest"]:
            st.note = f"cached: {stored} holds this source tree's base"
        elif os.environ.get("KAITO_E2E_REUSE_BASE") == "1" and stored_digest(stored):
            # For iterating on the harness only: the base may hold older sources than the tree.
            st.note = f"reused as is (KAITO_E2E_REUSE_BASE=1): {stored}"
        else:
            docker(run, "import", "--change", 'CMD ["/bin/bash"]', "--change", f"ENV PATH={IMAGE_PATH}",
                   str(tarball), IMPORTED)
            build_base(run, house)
            st.note = f"runs as uid {run.facts['base_uid']}"
            run.sizes.append((LOCAL_BASE, image_size(run, LOCAL_BASE), "docker image"))
    with Step(run, "registry"):
        run.registry = start_registry(run.work / "registry")
    with Step(run, "store-base") as st:
        if "base_uid" in run.facts:  # built now: docker push, then copy into the layout, digests unchanged
            pushed = f"{run.registry.host}/{BASE_REPOSITORY}:{KAITO_VERSION}"
            docker(run, "tag", LOCAL_BASE, pushed)
            docker(run, "push", pushed, logname="push-base", timeout=1800)
            sh(run, [kaito_cli(), "image", "copy", pushed, stored, "--quiet"], logname="store-base", timeout=1200)
            record.write_text(json.dumps({"digest": stored_digest(stored), "ref": stored}))
        st.note = stored
    run.facts["stored_base"] = stored
    run.sizes.append((stored, pushed_size(inspect_image(stored)), "what build-preset finds by default"))


def preset_steps(run: Run) -> None:
    """`make build-preset` on that base, then the image itself in docker: /chat, and tuning imports."""
    base_manifest = inspect_image(run.facts["stored_base"])
    with Step(run, "build-preset") as st:
        built = build_preset(run)
        preset_manifest = inspect_image(built)
        added = check_appended(built, base_manifest, preset_manifest)
        st.note = f"{len(base_manifest['layers'])} base layers reused, {len(added)} appended"
    run.facts["appended_layers"] = [(layer["mediaType"], layer["size"]) for layer in added]
    image = preset_image(run.registry.host, PRESET, built.rsplit(":", 1)[1])
    with Step(run, "push-preset"):
        sh(run, [kaito_cli(), "image", "copy", built, image, "--quiet"], logname="push-preset", timeout=1200)
    run.sizes.append((image, pushed_size(preset_manifest),
                      f"appended {sum(layer['size'] for layer in added) / 1e6:.1f} MB"))
    with Step(run, "pull"):
        docker(run, "pull", image, logname="pull", timeout=1200)
    run.sizes.append((image + " (pulled)", image_size(run, image), "docker image"))
    with Step(run, "serve") as st:
        result = serve_and_chat(run, image)
        st.note = f"/chat answered in {result['chat_seconds']} s"
    run.facts["chat"] = result["chat"]
    with Step(run, "tuning-imports") as st:
        st.note = check_tuning_imports(run, image)
    with Step(run, "decode-glue") as st:
        st.note = check_prebuilt_glue(run, image)


def check_prebuilt_glue(run: Run, image: str) -> str:
    """Without a compiler (PATH holds only the venv, as in the slim image) the runtime loads the decode glue that
    Dockerfiles/base prebuilt, threaded on torch's OpenMP team: CPU pods get the fast decode step."""
    probe = docker(run, "run", "--rm", "--network", "none", "-e", "PATH=/opt/kaito/bin", "-e", "CC=/nonexistent",
                   "--entrypoint", "python", image, "-m", "kaito.runtime.cglue", check=False)
    line = next((x for x in probe.stdout.splitlines() if x.startswith("decode glue: ")), "")
    if "/kaito/runtime/kernels/decode_glue-" not in line or "threaded: True" not in line:
        raise StepFailed(f"{image} without a compiler did not load a prebuilt, threaded decode glue "
                         f"(Dockerfiles/base's `python -m kaito.runtime.cglue --prebuild`):\n{probe.stdout[-1500:]}")
    run.facts["decode_glue"] = line
    return line.split("/")[-1]


# The tuning Job runs `python -m kaito.tuning` on the preset image (operator/render_tuning.py):
# its entry point, data reader (pyarrow) and trainer stack (peft) must import there.
TUNING_PROBE = ("import json, pyarrow, peft\n"
                "import kaito.tuning.cli, kaito.tuning.data\n"
                "print(json.dumps({'pyarrow': pyarrow.__version__, 'peft': peft.__version__}))")


def check_tuning_imports(run: Run, image: str) -> str:
    probe = docker(run, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", TUNING_PROBE)
    # sh() appends stderr (library warnings) after stdout: the probe's one JSON line is among them.
    line = next((x for x in probe.stdout.splitlines() if x.startswith('{"pyarrow"')), None)
    if line is None:
        raise StepFailed(f"the tuning import probe printed no versions in {image}:\n{probe.stdout[-1500:]}")
    versions = json.loads(line)
    usage = docker(run, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-m", "kaito.tuning",
                   "--help")
    if "--config" not in usage.stdout or "--push" not in usage.stdout:
        raise StepFailed(f"`python -m kaito.tuning --help` in {image} shows no tuning flags:\n{usage.stdout[-1000:]}")
    run.facts["tuning_in_image"] = versions
    return f"python -m kaito.tuning runs; pyarrow {versions['pyarrow']}"


def pipeline(run: Run) -> None:
    base_steps(run)
    if not run.base_only:
        preset_steps(run)


def stored_digest(ref: str) -> str | None:
    try:
        return inspect_image(ref)["digest"]
    except KaitoError:
        return None


def base_key(run: Run, rootfs: Path, wheelhouse: Path) -> str:
    """What the base is built from: Dockerfile, build args, copied sources, wheels and rootfs."""
    text = run.dockerfile.read_text()
    files = sorted(p for pattern in copy_sources(text) for src in REPO.glob(pattern)
                   for p in ([src] if src.is_file() else src.rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    sources = [(str(p.relative_to(REPO)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    return digest_of(text, run.build_args, sources, wheelhouse.name, rootfs.name)


def inspect_image(ref: str) -> dict:
    from kaito.image_builder import inspect

    return inspect(ref)


def check_appended(image: str, base: dict, preset: dict) -> list[dict]:
    """The preset image is the base's layers, by digest and in order, plus the weight layers."""
    base_layers = [layer["digest"] for layer in base["layers"]]
    preset_layers = [layer["digest"] for layer in preset["layers"]]
    if preset_layers[: len(base_layers)] != base_layers or len(preset_layers) <= len(base_layers):
        raise StepFailed(f"{image} does not reuse the base's {len(base_layers)} layers and append weights: "
                         f"base {base_layers} vs preset {preset_layers}")
    return preset["layers"][len(base_layers):]


def cleanup(run: Run, failed: bool) -> None:
    for name in run.containers:
        subprocess.run(["docker", "rm", "-f", name], env={**os.environ, **run.env}, capture_output=True,
                       timeout=60, check=False)
    if run.registry is not None:
        run.registry.stop()
    stop_dockerd(run)
    # dockerd unmounts its overlays on a clean stop; a forced stop can leave some behind.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m.startswith(str(run.work))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    if failed:  # the full logs of the failed run outlive the work dir
        logs = run.cache / "last-failure-logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        for path in [*run.work.glob("*.log"), *run.work.glob("registry/*.log")]:
            shutil.copy2(path, logs / path.name)
        log(f"logs of the failed run: {logs}")
    if not run.keep:
        shutil.rmtree(run.work, ignore_errors=True)


def report(run: Run, total: float) -> None:
    log("\nstep           seconds  note")
    for name, seconds, note in run.timings:
        log(f"{name:<14} {seconds:7.1f}  {note or ''}")
    log(f"{'total':<14} {total:7.1f}")
    log("\nimage / artifact                                        size MB  note")
    for what, size, note in run.sizes:
        log(f"{what:<55} {size / 1e6:8.1f}  {note}")
    for key, value in run.facts.items():
        log(f"{key}: {json.dumps(value) if not isinstance(value, str) else value}")


def interrupted(signum, frame):
    raise KeyboardInterrupt  # a killed run still stops dockerd and the registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("KAITO_E2E_CACHE", REPO / "out" / "e2e-cache")))
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfiles" / "base",
                        help="the runtime Dockerfile to prove (default Dockerfiles/base)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                        help="extra build args for it (the imported Debian image fills the FROM args)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, docker data) for debugging")
    parser.add_argument("--base-only", action="store_true",
                        help="`make build-base`: build Dockerfiles/base and store it in the layout, nothing more")
    parser.add_argument("--registry", dest="layout", default=DEFAULT_LAYOUT,
                        help=f"where the base is stored as kaito-base:<version>, as make's REGISTRY: a layout "
                             f"directory (default {DEFAULT_LAYOUT}, relative to the repo) or, with --base-only, "
                             "a registry such as myregistry.azurecr.io")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # relative layout paths mean what they mean to make
    if os.geteuid() != 0:
        print("e2e-container: must run as root (it starts its own dockerd)", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    # Short path: containerd's sockets live under the exec root and unix socket paths are limited.
    run = Run(cache=args.cache.resolve(), work=Path(tempfile.mkdtemp(prefix="kaito-e2e-")), keep=args.keep,
              dockerfile=args.dockerfile.resolve(), build_args=dict(a.split("=", 1) for a in args.build_arg),
              layout=args.layout, base_only=args.base_only)
    signal.signal(signal.SIGTERM, interrupted)
    log(f"e2e-container: work dir {run.work}, cache {run.cache}")
    t0 = time.monotonic()
    rc = 0
    try:
        pipeline(run)
        if run.base_only:
            log(f"\nOK: base stored as {run.facts['stored_base']} (make build-preset finds it there)")
        else:
            log(f"\nOK: {PRESET} served from the container: {json.dumps(run.facts['chat'])[:300]}")
    except StepFailed as exc:
        log(f"\nFAILED at step {run.current!r}: {exc}")
        rc = 1
    except KeyboardInterrupt:
        log(f"\ninterrupted during step {run.current!r}")
        rc = 130
    except Exception as exc:  # noqa: BLE001 -- an unexpected error still names its step and cleans up
        log(f"\nFAILED at step {run.current!r}: {type(exc).__name__}: {exc}")
        rc = 1
    finally:
        t1 = time.monotonic()
        cleanup(run, failed=rc != 0)
        run.timings.append(("cleanup", time.monotonic() - t1, "containers, registry, dockerd, work dir"))
        report(run, time.monotonic() - t0)
        if run.keep:
            log(f"work dir kept: {run.work}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
