"""Fixtures for kaito.operator tests (helpers live in op_harness.py beside this file)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from kaito.operator.handlers import OperatorState, run_operator
from op_harness import (
    Cluster,
    Emulator,
    Harness,
    declare_resources,
    fast_exit,
    make_settings,
)


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Any]:
    async with Emulator() as k8s, kmock.Server(k8s) as server:
        declare_resources(k8s)
        yield Cluster(k8s, str(server.url).rstrip("/"))


@pytest_asyncio.fixture()
async def operator_factory(emulator: Any) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def start(**settings_kw: Any) -> Harness:
        state = OperatorState(
            settings=make_settings(**settings_kw),
            connection=kopf.ConnectionInfo(server=emulator.url, insecure=True, default_namespace="default"),
            tune_kopf=fast_exit,
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_operator(state, stop_flag=stop, ready_flag=ready))
        tasks.append((task, stop))
        await asyncio.wait_for(ready.wait(), 20)
        h = Harness(emulator.k8s, state)
        await h.wait_for(lambda: state.api is not None, what="login")
        return h

    yield start
    for task, stop in tasks:
        stop.set()
        # Kopf waits 5 s for "hung" tasks, which in one event loop include the emulator's
        # open watch streams; cancelling makes it stop those at once.
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
