"""torchrun support: rank 0 schedules and broadcasts each step's plan; other ranks replay it.

Called by `kaito.runtime.launch.main` when WORLD_SIZE > 1. Rank 0 runs the HTTP
server and the engine, whose `broadcast` hook sends every step's plan (rows
kept, tokens decoded, prompts prefilled, adapter changes) before running it;
worker ranks run `worker_loop`, executing the same forwards so a tensor-parallel
model (CUDA, transformers tp_plan) computes collectively, or a replica stays in
step. Plans (`kaito.runtime.plan.StepPlan`) travel as versioned JSON bytes (no pickle); a worker that
receives another version than its own exits naming both. Workers with LOCAL_RANK also
answer GET /health on 5000 + LOCAL_RANK so each pod's probe passes (and GET
/worker with their rank, replayed step count and adapters, for checks).

Rank 0 broadcasts one plan per forward, and a failed forward is contained on
every rank alike (`kaito.runtime.faults`): a worker's `Replayer` swallows a
forward that raised when rank 0's next plan says rank 0's failed too
(`after_fault`; it then replays rank 0's row-by-row retries), and drops what
its own copy did when only rank 0's failed. A worker never outlives a failed
rank 0 nor hides its own failure: a device or group fault, a failed probe, a
forward that failed only here, or a stop plan carrying rank 0's error ends
the worker process non-zero, and torchrun then ends the whole group.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from kaito.runtime.faults import env_fault, is_device_fault
from kaito.runtime.plan import PlanVersionError, StepPlan
from kaito.runtime.settings import RuntimeSettings, listen_port

log = logging.getLogger("kaito.runtime.distributed")


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int]:
    """Join the process group (NCCL on CUDA, else gloo)."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return rank, size


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def send_plan(plan: StepPlan) -> None:
    """Rank 0: broadcast the plan of the next forward(s) to every worker rank (the engine's `broadcast` hook)."""
    _broadcast_bytes(plan.to_json())


def receive_plan() -> StepPlan:
    """A worker rank: the plan rank 0 sends next. PlanVersionError when rank 0 speaks another plan version."""
    return StepPlan.from_json(_broadcast_bytes(None))


def _broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0 passes its bytes, the others None; every rank gets rank 0's bytes (JSON, never pickle)."""
    dev = _device()
    if data is not None:
        size = torch.tensor([len(data)], dtype=torch.long, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.long, device=dev)
    dist.broadcast(size, src=0)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return data if data is not None else buf.cpu().numpy().tobytes()


def tp_plan_for(settings: RuntimeSettings) -> str | None:
    """Shard with transformers' tensor parallelism only on CUDA; CPU ranks keep replicas."""
    _, size = world()
    return "auto" if size > 1 and settings.tensor_parallel and torch.cuda.is_available() else None


def rank0_health_url(settings: RuntimeSettings) -> str:
    """Where rank 0 answers /health, on the base port (rank 0's LOCAL_RANK is 0): on rank 0's node (torchrun's
    GROUP_RANK 0) the address it binds (loopback for a wildcard bind: `--standalone` sets MASTER_ADDR to a
    host name that need not reach a loopback bind), on other nodes torchrun's MASTER_ADDR."""
    if os.environ.get("GROUP_RANK", "0") == "0":
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    else:
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return f"http://{host}:{settings.port}/health"


def health_app(ready: threading.Event, stats: dict, rank0: str):
    """A worker pod's /health (the probe on 5000 + LOCAL_RANK); no inference here.

    Every rank reports the group's health: rank 0 schedules every step, so a worker is healthy only while it
    is loaded and rank 0's /health (at `rank0`) says so; a worker never says Healthy next to a dead rank 0."""
    import httpx
    from fastapi import FastAPI
    from kaito.runtime.api import health_routes

    async def health() -> tuple[int, dict]:
        if not ready.is_set():
            return 503, {"status": "Loading"}
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                r = await client.get(rank0)
        except httpx.HTTPError as e:
            return 503, {"status": "Unhealthy", "detail": f"rank 0 does not answer at {rank0}: {e!r}"}
        if r.status_code != 200:
            return 503, {"status": "Unhealthy" if r.status_code != 503 or "Loading" not in r.text else "Loading",
                         "detail": f"rank 0 answers {r.status_code} at {rank0}"}
        return 200, {"status": "Healthy"}

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(health_routes(health))

    @app.get("/worker")
    async def worker():
        return {"rank": dist.get_rank(), "pid": os.getpid(), "steps": stats["steps"], "adapters": sorted(stats["adapters"])}

    return app


def _health_server(settings: RuntimeSettings, ready: threading.Event, stats: dict) -> None:
    import uvicorn

    uvicorn.run(health_app(ready, stats, rank0_health_url(settings)), host=settings.host, port=listen_port(settings),
                log_level="warning")


class Replayer:
    """A worker rank's replay of rank 0's plans on its own executor: adapter changes, evict (`keep`, which also
    drops rows that only this rank's copy of a failed prefill added), prefills, a probe, a decode."""

    def __init__(self, ex, fault=None):
        self.ex, self.fault = ex, fault  # fault: `kaito.runtime.faults.env_fault`'s check (tests)
        self.rank = dist.get_rank() if dist.is_initialized() else 1
        self.prompts: list = []  # per cache row, for `fault`
        self.failed: BaseException | None = None  # this rank's last forward raised (not a device fault)
        self.decoded = 0  # rows the last plan decoded here

    def replay(self, plan: StepPlan) -> None:
        if self.failed is not None and not plan.after_fault:
            raise SystemExit(f"rank {self.rank}: a forward failed here ({self.failed!r}) but not on rank 0; "
                             "the ranks left lock-step")
        if plan.after_fault and self.decoded:  # rank 0's decode failed, this one did not
            self.ex.undo_decode(self.decoded)
        self.failed, self.decoded = None, 0
        self._adapters(plan.ops)
        self.ex.evict(list(plan.keep))
        self.prompts = [self.prompts[i] for i in plan.keep]
        if plan.probe:  # rank 0's check that the device still works: a failure here ends this rank too
            self.ex.prefill_forward([list(p) for p in plan.probe], [()])
        try:
            if plan.prefill:
                prompts = plan.prompts
                if self.fault is not None:
                    self.fault("prefill", prompts)
                self.ex.prefill(prompts, plan.loras)
                self.prompts += prompts
            if plan.decode:
                if self.fault is not None:
                    self.fault("decode", self.prompts[:len(plan.decode)])
                self.ex.decode(list(plan.decode))
                self.decoded = len(plan.decode)
        except Exception as e:
            if is_device_fault(e):
                raise
            log.warning("rank %d: a forward failed (%r); waiting for rank 0's retries", self.rank, e)
            self.failed = e

    def _adapters(self, ops) -> None:
        for op in ops:
            if op.kind == "load":
                from kaito.runtime.lora import read_adapter

                self.ex.lora.add(read_adapter(op.path, op.name, self.ex.model))
            else:
                self.ex.lora.remove(op.name)


def worker_loop(settings: RuntimeSettings) -> None:
    """Non-zero ranks: load the same model, then replay plans until rank 0 says stop."""
    from kaito.runtime.executor import BatchExecutor
    from kaito.runtime.loader import load

    ready = threading.Event()
    stats: dict = {"steps": 0, "adapters": []}
    if os.environ.get("KAITO_WORKER_HEALTH", "1") == "1":
        threading.Thread(target=_health_server, args=(settings, ready, stats), daemon=True).start()
    from kaito.runtime.serving import default_torch_threads, freeze_heap

    threads = default_torch_threads(settings)
    if threads is not None:
        torch.set_num_threads(threads)  # the same share of the cores as rank 0's
    loaded = load(settings, tp_plan=tp_plan_for(settings))
    replayer = Replayer(BatchExecutor(loaded.model), env_fault(loaded.tokenizer))
    freeze_heap()  # a full collection here would stall every rank's collectives
    ready.set()
    log.info("rank %d ready, replaying rank 0's steps", dist.get_rank())
    while True:
        try:
            plan = receive_plan()
        except PlanVersionError as e:
            raise SystemExit(f"rank {dist.get_rank()}: {e}") from None
        if plan.stop:
            if plan.error is not None:  # rank 0 failed: this rank's process must fail too (torchrun ends the group)
                raise SystemExit(f"rank 0 stopped after an error: {plan.error or 'no message; see its log'}")
            break
        if plan.noop:
            continue
        replayer.replay(plan)
        stats["steps"] += 1
        stats["adapters"] = list(replayer.ex.lora.adapters)
