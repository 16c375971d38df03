"""Prometheus metrics (vLLM's names under a `kaito:` prefix) and Kaito's JSON GPU/CPU report.

Created once per app by `build_app` (its own CollectorRegistry, so several
apps in one process never collide), updated by the engine and serving layer,
exposed by the api at GET /metrics (Prometheus text) and GET /kaito/metrics
(Kaito's JSON `{"gpu_info": [...], "cpu_info": {...}}`).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "kaito:"
# vLLM's buckets: sub-10ms decode steps up to minute-long requests.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class Metrics:
    def __init__(self, model_name: str = ""):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences queued for a batch slot.", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a sequence.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish of a sequence.", buckets=E2E_BUCKETS, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished sequences by finish reason.", ["finished_reason"], registry=r)
        self.adapter_loads = Counter(PREFIX + "lora_adapter_loads", "Adapters loaded (start and run time).", registry=r)
        self.adapters_loaded = Gauge(PREFIX + "lora_adapters_loaded", "Adapters currently loaded.", registry=r)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before running, by reason.", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def system_info() -> dict:
    """Kaito's /metrics JSON: per-GPU load/memory when CUDA is there, CPU and memory use always."""
    import psutil

    out: dict = {"gpu_info": None, "cpu_info": None}
    try:
        import torch

        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                try:
                    load = float(torch.cuda.utilization(i))
                except Exception:  # needs pynvml; absent in slim images
                    load = None
                gpus.append({
                    "id": str(i),
                    "name": torch.cuda.get_device_name(i),
                    "load": load,
                    "temperature": None,
                    "memory": {"used": f"{(total - free) / 2**30:.2f} GB", "total": f"{total / 2**30:.2f} GB"},
                })
            out["gpu_info"] = gpus
    except ImportError:
        pass
    vm = psutil.virtual_memory()
    out["cpu_info"] = {
        "load_percentage": psutil.cpu_percent(interval=None),
        "physical_cores": psutil.cpu_count(logical=False),
        "total_cores": psutil.cpu_count(logical=True),
        "memory": {"used": f"{vm.used / 2**30:.2f} GB", "total": f"{vm.total / 2**30:.2f} GB"},
    }
    return out
