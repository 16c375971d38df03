"""Prometheus metrics under vLLM's names, types and labels, and Kaito's JSON GPU/CPU report.

Created once per app by `Runtime` (`kaito.runtime.serving`; its own CollectorRegistry, so several apps
in one process never collide) and bound to the served model name once it is loaded (`bind`). The
engine (`kaito.runtime.engine`: admission, prefill, each step's gauges) and its output processor
(`kaito.runtime.output`: each token, finish) call the `record_*` methods; the serving layer counts
adapters and refusals. Exposed by the
api at GET /metrics (Prometheus text) and GET /kaito/metrics (Kaito's JSON `{"gpu_info", "cpu_info"}`).

Names follow vLLM's v1 Prometheus logger (vllm/v1/metrics/loggers.py): every series carries
`model_name` and `engine` labels, so Kaito's monitoring docs, Grafana dashboards built for vLLM and
keda-kaito-scaler (which scales on `vllm:num_requests_waiting`) read this server unchanged.
`vllm:gpu_cache_usage_perc` is the older name of `vllm:kv_cache_usage_perc` (vLLM <= 0.10, Kaito's
docs list it); both are exposed. This engine never preempts, so `vllm:num_preemptions_total` stays 0.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "vllm:"
LABELS = ("model_name", "engine")
ENGINE = "0"  # one engine per server, as vLLM without data parallelism
# vLLM's buckets: sub-10ms decode steps up to minute-long requests.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
# vLLM's build_1_2_5_buckets for token counts (1, 2, 5, 10, 20, 50, ...) up to 1M tokens.
TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        self._labelled: list = []  # every metric carrying the model_name label (re-bound by `bind`)

        def keep(metric):
            self._labelled.append(metric)
            return metric

        def gauge(name, doc, extra=()):
            return keep(Gauge(PREFIX + name, doc, [*LABELS, *extra], registry=r))

        def counter(name, doc, extra=()):
            return keep(Counter(PREFIX + name, doc, [*LABELS, *extra], registry=r))

        def hist(name, doc, buckets):
            return keep(Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=r))

        self._running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self._waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self._kv = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._gpu_kv = gauge("gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage (older name of kv_cache_usage_perc).")
        self._preemptions = counter("num_preemptions", "Cumulative number of preemptions from the engine.")
        self._prompt = counter("prompt_tokens", "Number of prefill tokens processed.")
        self._generation = counter("generation_tokens", "Number of generation tokens processed.")
        self._success = counter("request_success", "Count of successfully processed requests.", ("finished_reason",))
        self._req_prompt = hist("request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self._req_generation = hist("request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS)
        self._max_tokens = hist("request_params_max_tokens", "Histogram of the max_tokens request parameter.", TOKEN_BUCKETS)
        self._ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self._tpot = hist("time_per_output_token_seconds", "Histogram of time per output token in seconds.", ITL_BUCKETS)
        self._itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self._e2e = hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_BUCKETS)
        self._queue = hist("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        self._inference = hist("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", REQUEST_BUCKETS)
        self._prefill = hist("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", REQUEST_BUCKETS)
        self._decode = hist("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", REQUEST_BUCKETS)
        # vLLM's info gauge: value = when the set last changed, adapters in labels (no model_name label there).
        self._lora_info = Gauge(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._lora_key: tuple | None = None
        self.max_lora = 0  # vLLM's --max-loras label; this server has no such bound
        # Kaito-specific (no vLLM equivalent): adapter loads and refusals before running.
        self.adapter_loads = Counter("kaito:lora_adapter_loads", "Adapters loaded (start and run time).", registry=r)
        self.adapters_loaded = Gauge("kaito:lora_adapters_loaded", "Adapters currently loaded.", registry=r)
        self.rejected = Counter("kaito:request_rejected", "Requests refused before running, by reason.", ["reason"], registry=r)
        self._labels: tuple[str, str] | None = None
        self.bind("")  # the served name is known once the model loads: `bind` again then

    def bind(self, model_name: str) -> None:
        """Label every series with this served model name (set once the model is loaded); drops the old label set."""
        new = (model_name, ENGINE)
        if self._labels is not None and self._labels != new:
            for m in self._labelled:  # called before any request: nothing recorded under the old name is lost
                m.clear()
        self._labels = new
        self.running, self.waiting = self._running.labels(*new), self._waiting.labels(*new)
        self.kv_usage, self.gpu_kv_usage = self._kv.labels(*new), self._gpu_kv.labels(*new)
        self.preemptions = self._preemptions.labels(*new)
        self.prompt_tokens, self.generation_tokens = self._prompt.labels(*new), self._generation.labels(*new)
        self.req_prompt, self.req_generation = self._req_prompt.labels(*new), self._req_generation.labels(*new)
        self.max_tokens, self.queue = self._max_tokens.labels(*new), self._queue.labels(*new)
        self.ttft, self.tpot, self.itl = self._ttft.labels(*new), self._tpot.labels(*new), self._itl.labels(*new)
        self.e2e, self.inference = self._e2e.labels(*new), self._inference.labels(*new)
        self.prefill, self.decode = self._prefill.labels(*new), self._decode.labels(*new)

    def success(self, reason: str) -> Counter:
        model_name, engine = self._labels or ("", ENGINE)  # always set: __init__ binds ""
        return self._success.labels(model_name, engine, reason)

    # ---- recording points, called by the engine threads --------------------------------------
    def record_scheduler(self, running: int, rows: list, queued, capacity_tokens: int) -> None:
        """Each step: batch and queue sizes, KV-cache use (tokens held / rows x context), adapters in use."""
        self.running.set(running)
        queued = list(queued)  # a snapshot: the event loop appends while the engine reads
        self.waiting.set(len(queued))
        used = sum(len(s.prompt_ids) + len(s.output_ids) for s in rows)
        usage = min(1.0, used / capacity_tokens) if capacity_tokens > 0 else 0.0
        self.kv_usage.set(usage)
        self.gpu_kv_usage.set(usage)
        key = (str(self.max_lora), _adapters(queued), _adapters(rows))
        if key != self._lora_key:
            self._lora_info.clear()
            self._lora_info.labels(*key).set(time.time())
            self._lora_key = key

    def record_scheduled(self, seqs: list) -> None:
        """Sequences leaving the queue for a prefill: their time in WAITING."""
        now = time.monotonic()
        for s in seqs:
            s.scheduled_at = now
            self.queue.observe(now - s.arrival)
            self.max_tokens.observe(s.params.max_tokens)

    def record_prefill(self, seqs: list) -> None:
        self.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))

    def record_token(self, s, now: float) -> None:
        """One generated token of `s`, before the output processor updates its first/last token times."""
        if s.first_token_at is None:
            self.ttft.observe(now - s.arrival)
        else:
            self.itl.observe(now - s.last_token_at)
        self.generation_tokens.inc()

    def record_finished(self, s, reason: str) -> None:
        now = time.monotonic()
        self.success(reason).inc()
        self.e2e.observe(now - s.arrival)
        self.req_prompt.observe(len(s.prompt_ids))
        self.req_generation.observe(len(s.output_ids))
        started = s.scheduled_at
        if started is not None:
            self.inference.observe(now - started)
            if s.first_token_at is not None:
                self.prefill.observe(max(0.0, s.first_token_at - started))
                self.decode.observe(max(0.0, (s.last_token_at or now) - s.first_token_at))
        if s.first_token_at is not None and len(s.output_ids) > 1:
            self.tpot.observe(((s.last_token_at or now) - s.first_token_at) / (len(s.output_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _adapters(seqs) -> str:
    """vLLM's label format: the adapter names in use, comma-separated."""
    return ",".join(sorted({name for s in seqs for name, _ in (s.lora or ())}))


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
