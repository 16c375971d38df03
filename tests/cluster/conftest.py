"""Fixtures of the cluster in a box (docker + slow): `cluster_env` (session) and `cluster` (per test).

`cluster_env` is built once per test run: our own dockerd and loopback registry, the runtime
base from `make build-base`'s steps (tests/e2e/container.py: built only when the sources changed,
shared with tests/e2e/test_container.py through the out/registry layout), copied to the
registry as `<registry>/kaito-base:<version>` (the operator's puller image), and the preset
images the seed's Workspaces name, built by `kaito image build-preset` on that base with the
embedded tiny model's weights. `cluster` runs the real Kopf operator against kmock's emulated
API server (as tests/operator does) with `registry` pointed at the loopback registry, plus
tests/cluster/controllers.py playing Karpenter, the workload controllers and the kubelet.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "operator", HERE.parent / "e2e"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from controllers import Controllers  # noqa: E402
from kubelet import Kubelet  # noqa: E402
from op_harness import Emulator, Harness, declare_resources, fast_exit, make_settings  # noqa: E402

TOOLS = ("dockerd", "docker", "mmdebstrap", "docker-registry", "nsenter")
# The seed's Workspaces name the phi-3 presets, the multi-node case a preset that supports
# distributed inference; their images carry the tiny model's weights.
SEED_PRESETS = ("phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "falcon-40b-instruct")


@dataclass
class ClusterEnv:
    run: Any  # container_parts.Run: dockerd env, registry, work dir
    registry: str  # 127.0.0.1:PORT
    base_image: str
    kubelet: Kubelet


def _kaito(*args: str) -> str:
    kaito = Path(sys.executable).with_name("kaito")
    proc = subprocess.run([str(kaito), *args], capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"kaito {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def seed_weights(dest: Path, preset: str) -> Path:
    """The tiny model's weights standing for `preset`: its context length raised to the preset's
    max_model_len, which the runtime checks against max_position_embeddings (RoPE has no table)."""
    from kaito.presets import get_preset, make_tiny

    make_tiny(dest, size="tiny", overwrite=True)
    cfg = json.loads((dest / "config.json").read_text())
    need = get_preset(preset).max_model_len or cfg["max_position_embeddings"]
    cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = max(need, cfg["max_position_embeddings"])
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


@pytest.fixture(scope="session")
def cluster_env() -> Iterator[ClusterEnv]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(TOOLS)} (missing: {', '.join(missing) or 'root'})")
    import container
    from container_parts import Run, StepFailed
    from kaito.presets import __version__
    from kaito.presets.images import base_image

    cache = Path(os.environ.get("KAITO_E2E_CACHE", HERE.parents[1] / "out" / "e2e-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    run = Run(cache=cache.resolve(), work=Path(tempfile.mkdtemp(prefix="kaito-cl-")), keep=False)
    cwd = os.getcwd()
    failed = True
    try:
        os.chdir(HERE.parents[1])  # the layout path is relative to the repo, as for make
        try:
            container.base_steps(run)
            host = run.registry.host
            base = base_image(host, __version__)  # the operator's puller image, by its one rule
            _kaito("image", "copy", run.facts["stored_base"], base, "--quiet")
        finally:
            os.chdir(cwd)
        for preset in SEED_PRESETS:
            weights = seed_weights(run.work / f"weights-{preset}", preset)
            _kaito("image", "build-preset", preset, "--registry", host, "--weights", str(weights),
                   "--base", base, "--no-modelpack", "--quiet")
        kubelet = Kubelet(run.env, run.work, int(host.rsplit(":", 1)[1]), base)
        kubelet.docker("pull", base, timeout=1200)
        kubelet.start_network()
        failed = False
        yield ClusterEnv(run, host, base, kubelet)
    except StepFailed as exc:
        pytest.fail(f"cluster set-up failed at {run.current}: {exc}")
    finally:
        if "kubelet" in locals():
            kubelet.stop_all()
        container.cleanup(run, failed=failed)


@dataclass
class Cluster:
    h: Harness
    controllers: Controllers
    env: ClusterEnv
    current: str = ""  # the Workspace under test, for failure messages


@pytest_asyncio.fixture()
async def cluster(cluster_env: ClusterEnv) -> AsyncIterator[Cluster]:
    from kaito.operator.handlers import OperatorState, run_operator

    async with Emulator() as k8s, kmock.Server(k8s) as server:
        declare_resources(k8s)
        state = OperatorState(
            settings=make_settings(registry=cluster_env.registry, resync_seconds=2.0, retry_seconds=1.0),
            connection=kopf.ConnectionInfo(server=str(server.url).rstrip("/"), insecure=True,
                                           default_namespace="default"),
            tune_kopf=fast_exit,
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        op_task = asyncio.create_task(run_operator(state, stop_flag=stop, ready_flag=ready))
        await asyncio.wait_for(ready.wait(), 30)
        h = Harness(k8s, state)
        await h.wait_for(lambda: state.api is not None, what="operator login")
        controllers = Controllers(h, cluster_env.kubelet)
        ctl_task = asyncio.create_task(controllers.run(stop))
        try:
            yield Cluster(h, controllers, cluster_env)
        finally:
            stop.set()
            await asyncio.wait({ctl_task}, timeout=5)
            await asyncio.to_thread(cluster_env.kubelet.stop_all)
            done, _ = await asyncio.wait({op_task}, timeout=1.0)
            if not done:
                op_task.cancel()
                try:
                    await op_task
                except asyncio.CancelledError:
                    pass
