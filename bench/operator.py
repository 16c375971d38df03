"""Benchmark of the Kaito operator against kmock's Kubernetes emulator (no cluster needed).

Measures, with the real Kopf operator running in-process on 127.0.0.1:
  1. time from one Workspace's creation to all its children present (goal <= 1 s);
  2. time from creating N Workspaces (default 100) to all their children present (goal <= 30 s);
  3. API writes during a no-op period after everything settled (goal 0).
The cluster already has Ready GPU nodes matching the workspaces, so the
children are the ConfigMap, Service and Deployment (no NodeClaim round trip).
There is no runnable reference operator here, so the "baseline" column is the
issue's goal for each number and the ratio is ours / goal.

Usage: .venv/bin/python bench/operator.py [--workspaces 100] [--quiet-seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

import kmock
import kopf
import yaml
from kaito.operator.handlers import OperatorState, run_operator
from op_harness import (
    EXAMPLES,
    Emulator,
    Harness,
    declare_resources,
    fast_exit,
    make_settings,
)


def _workspace(i: int) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / "workspace-phi-3-mini.yaml").read_text())
    body["metadata"]["name"] = f"bench-{i:04d}"
    return body


def _children_present(h: Harness, name: str) -> bool:
    return all(
        h.obj(res, "default", n) is not None
        for res, n in (("v1/configmaps", f"{name}-inference-config"), ("v1/services", name), ("apps/v1/deployments", name))
    )


async def _bench(n: int, quiet: float) -> list[tuple[str, float, float, str]]:
    async with Emulator() as k8s, kmock.Server(k8s) as server:
        declare_resources(k8s)
        state = OperatorState(
            settings=make_settings(resync_seconds=2.0, retry_seconds=1.0),
            connection=kopf.ConnectionInfo(server=str(server.url).rstrip("/"), insecure=True),
            tune_kopf=fast_exit,
        )
        h = Harness(k8s, state)
        labels = {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"}
        for i in range(2):
            await h.add_node(f"gpu-{i}", labels)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_operator(state, stop_flag=stop, ready_flag=ready))
        await asyncio.wait_for(ready.wait(), 30)
        await h.wait_for(lambda: state.api is not None, what="login")

        # Warm-up: the first workspace also waits for Kopf's watch streams to be established.
        await h.create_workspace(_workspace(9999))
        await h.wait_for(lambda: _children_present(h, "bench-9999"), timeout=60, what="warm-up")

        t0 = time.perf_counter()
        await h.create_workspace(_workspace(0))
        await h.wait_for(lambda: _children_present(h, "bench-0000"), timeout=60, what="children of one workspace")
        one = time.perf_counter() - t0

        t0 = time.perf_counter()
        await asyncio.gather(*(h.create_workspace(_workspace(i)) for i in range(1, n + 1)))
        names = [f"bench-{i:04d}" for i in range(1, n + 1)]
        await h.wait_for(lambda: all(_children_present(h, x) for x in names), timeout=600, what="all children")
        many = time.perf_counter() - t0

        # Act as the kubelet: every Deployment becomes ready, so every workspace settles.
        everything = ["bench-9999", "bench-0000", *names]
        for x in everything:
            await h.patch(f"/apis/apps/v1/namespaces/default/deployments/{x}/status", {"status": {"readyReplicas": 1}})
        for x in everything:
            await h.wait_for(lambda x=x: (h.condition("default", x, "WorkspaceSucceeded") or {}).get("status") == "True",
                             timeout=120, what=f"{x} ready")
            await h.settled("default", x)
        await asyncio.sleep(1.0)
        before = len(h.write_requests())
        passes_before = state.passes
        await asyncio.sleep(quiet)
        writes = len(h.write_requests()) - before
        passes = state.passes - passes_before

        stop.set()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    return [
        ("one workspace -> children present (s)", one, 1.0, ""),
        (f"{n} workspaces -> children present (s)", many, 30.0, ""),
        (f"API writes in {quiet:g} s of no-op reconciles", float(writes), 0.0, f"({passes} reconcile passes)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspaces", type=int, default=100, help="Workspaces created at once (default 100).")
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="No-op window measured for writes.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # Kopf logs every temporary wait at ERROR level
    rows = asyncio.run(_bench(args.workspaces, args.quiet_seconds))
    print(f"{'metric':48} {'ours':>10} {'baseline(goal)':>15} {'ratio':>8}")
    for name, ours, goal, note in rows:
        ratio = f"{ours / goal:.3f}" if goal else ("0" if ours == 0 else "inf")
        print(f"{name:48} {ours:10.3f} {goal:15.3f} {ratio:>8} {note}")


if __name__ == "__main__":
    main()
