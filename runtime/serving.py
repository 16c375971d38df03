"""Serving logic shared by every endpoint: the runtime state, model/adapter resolution, generation.

Called by the serving logic behind the routers of `kaito.runtime.api`: `openai_serving`,
`responses` (OpenAI) and `kaito_chat` (Kaito's /chat). `Runtime` owns the loaded model,
the engine thread and the adapters; `ApiError` is the one exception type the
api maps to status codes (OpenAI envelope on /v1, `detail` on /chat).
`submit()` turns prompt ids into engine sequences and `events()` yields their
tokens and finishes, cancelling them when the client goes away.

When the model cannot be loaded, or the engine meets a fault it cannot
contain to one request, `on_fatal` (set by `kaito.runtime.launch`) ends the
process non-zero, as vLLM and Kaito's server do, so Kubernetes shows the crash
and restarts the pod instead of a server answering 503 forever.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from kaito.presets.contract import ADAPTER_CONFIG_FILE
from kaito.presets.errors import KaitoError
from kaito.runtime.engine import Engine
from kaito.runtime.lora import RowSpec, discover_adapters, read_adapter
from kaito.runtime.metrics import Metrics
from kaito.runtime.plan import AdapterOp, StepPlan
from kaito.runtime.sampling import SamplingParams
from kaito.runtime.sequence import EngineDead, Finished, NeverFits, QueueFull, Sequence, Token
from kaito.runtime.settings import RuntimeSettings, adapter_strength

if TYPE_CHECKING:
    from kaito.runtime.loader import Loaded

log = logging.getLogger("kaito.runtime")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "BadRequestError", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers or {}


def not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")



def freeze_heap() -> None:
    """Move every object alive after loading (torch, transformers, the model's modules: about 375,000 on the
    88M bench model) out of the garbage collector's reach, as vLLM does after start-up.

    Why: a full (generation 2) collection walks every tracked object while holding the GIL, stalling the
    engine thread and the event loop alike. Loading ran 6 of them, up to 111 ms each (88M model); a later
    one, whenever the survivors of serving add up, would cost as much in the middle of some request's
    stream. Frozen, the tracked heap is ~130 objects and a full collection 0.2 ms (150 ms unfrozen, at
    exit). Frozen objects are never freed, which costs nothing: they live as long as the server."""
    gc.collect()
    gc.freeze()


class Runtime:
    """The server's state: settings, metrics, and (once loaded) model, engine and adapters."""

    def __init__(self, settings: RuntimeSettings, broadcast: Callable[[StepPlan], None] | None = None,
                 tp_plan: str | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.broadcast = broadcast  # under torchrun: rank 0's plan broadcast (`kaito.runtime.distributed.send_plan`)
        self.tp_plan = tp_plan  # transformers' tensor-parallel plan under torchrun on CUDA, else None
        self.status = "loading"
        self.error: str | None = None
        self.loaded: Loaded | None = None
        self.engine: Engine | None = None
        self.strengths: dict[str, float] = {}
        self.ready = threading.Event()
        self._adapter_lock = asyncio.Lock()
        self.on_fatal: Callable[[str], None] | None = None  # the server process: log and exit non-zero
        # Request preparation (tokenization, chat templates, grammar compiling) runs here, never on the event
        # loop: a 1 MiB prompt is ~1 s of tokenizer work. Half the cores at most and a lower CPU priority, so
        # four clients sending such prompts leave a core to the loop and the engine (/health p99 under 100 ms).
        self._prepare_pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) // 2),
                                                thread_name_prefix="kaito-prepare", initializer=_lower_priority)

    # ---- lifecycle ---------------------------------------------------------------
    def load(self) -> None:
        """Load model and adapters, start the engine (runs in a thread; /health says 503 until done)."""
        import torch

        from kaito.runtime.executor import BatchExecutor
        from kaito.runtime.loader import load

        try:
            threads = default_torch_threads(self.settings)
            if threads is not None:
                torch.set_num_threads(threads)
                log.info("torch intra-op threads: %d (the CPU cores this process may use, minus one for HTTP "
                         "from 4 up; set torch_threads to choose)", threads)
            self.loaded = loaded = load(self.settings, tp_plan=self.tp_plan)
            self.metrics.bind(loaded.model_name)  # vLLM's model_name label on every series
            compile_decode = self.settings.compile_decode and self.broadcast is None  # not under torchrun
            executor = BatchExecutor(loaded.model, compile_decode=compile_decode)
            if executor.compiled:  # before the adapters: a LoRA row decodes eagerly anyway
                t0 = time.perf_counter()
                log.info("compiling the decode step (compile_decode: torch.compile, inductor)")
                executor.warmup(loaded.eos_ids[0] if loaded.eos_ids else 0)
                log.info("decode step compiled in %.1f s", time.perf_counter() - t0)
            for name, path in discover_adapters(self.settings.adapters_dir):
                executor.lora.add(read_adapter(path, name, loaded.model))
                self.strengths[name] = adapter_strength(self.settings, name)
                self.metrics.adapter_loads.inc()
                log.info("adapter %s loaded from %s (strength %s)", name, path, self.strengths[name])
            self.metrics.adapters_loaded.set(len(self.strengths))
            prefill_thread = self.settings.prefill_thread and executor.concurrent_prefill_ok()
            if prefill_thread and loaded.model.device.type == "cpu" and torch.get_num_threads() > 1:
                log.warning("prefill_thread with %d torch threads: the two forward threads' OpenMP teams "
                            "oversubscribe the cores (88M bench model, 2 cores: 1-client TPOT 23 -> 30 ms); "
                            "set torch_threads=1 with it, or leave it off", torch.get_num_threads())
            self.engine = engine = Engine(
                executor, loaded.tokenizer, eos_ids=loaded.eos_ids, max_model_len=loaded.max_model_len,
                max_batch_size=self.settings.max_batch_size, max_waiting=self.settings.max_waiting,
                prefill_chunk_tokens=self.settings.prefill_chunk_tokens, prefill_step_ratio=self.settings.prefill_step_ratio,
                prefill_thread=prefill_thread, decode_run_s=self.settings.decode_run_ms / 1000,
                metrics=self.metrics, broadcast=self.broadcast,
            )
            if self.broadcast is not None:
                startup = tuple(AdapterOp("load", n, str(a.path)) for n, a in executor.lora.adapters.items())
                self.broadcast(StepPlan(ops=startup))  # the workers read the same adapters from the same paths
            engine.on_fatal = lambda e: self._fatal(f"the engine stopped: {e!r}")
            freeze_heap()
            engine.start()
            self.status = "ready"
            log.info("model %s ready (max_model_len %d)", loaded.model_name, loaded.max_model_len)
        except Exception as e:  # reported by /health and the logs; the pod restarts on its probe
            log.exception("loading the model failed")
            self.status, self.error = "failed", str(e) or repr(e)  # /health shows it: never empty
            if self.broadcast is not None:
                try:
                    self.broadcast(StepPlan(stop=True, error=self.error))  # worker ranks exit non-zero too
                except Exception:
                    log.exception("could not tell worker ranks to stop")
            self._fatal(f"loading the model failed: {e}")
        finally:
            self.ready.set()

    def _fatal(self, reason: str) -> None:
        log.critical("%s", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()  # a process that outlives this runtime (tests, embedders) gets its heap collected again

    async def prepare(self, fn: Callable, *args, **kwargs):
        """Run CPU-heavy request preparation (tokenizing, applying a chat template) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, functools.partial(fn, *args, **kwargs))

    # ---- lookups -----------------------------------------------------------------
    def require_ready(self) -> None:
        if self.status != "ready":
            raise ApiError(503, f"the model is {'still loading' if self.status == 'loading' else 'not available: ' + str(self.error)}; retry when GET /health says Healthy",
                           "ServiceUnavailableError", headers={"Retry-After": "5"})
        if self.engine is not None and self.engine.error is not None:
            raise ApiError(503, "the engine stopped after an internal error; the server must be restarted", "ServiceUnavailableError")

    def ready_parts(self) -> tuple[Loaded, Engine]:
        """The loaded model and its engine, for a request (require_ready's 503 while there are none)."""
        self.require_ready()
        if self.loaded is None or self.engine is None:  # "ready" is set only after both: never taken
            raise ApiError(503, "the model is not loaded; retry when GET /health says Healthy",
                           "ServiceUnavailableError", headers={"Retry-After": "5"})
        return self.loaded, self.engine

    @property
    def model_name(self) -> str:
        return self.loaded.model_name if self.loaded else (self.settings.served_model_name or self.settings.preset or "")

    def base_names(self) -> set[str]:
        names = {self.model_name}
        if self.settings.preset:
            names.add(self.settings.preset)
        return names

    def merged_spec(self) -> RowSpec:
        """Kaito's behaviour: every adapter at its strength (the bare base when none)."""
        return tuple((n, s) for n, s in sorted(self.strengths.items()) if s != 0.0)

    def resolve(self, model: str | None, strength: float | None) -> RowSpec:
        if model is None or model in self.base_names():
            if strength is not None:
                raise ApiError(400, "adapter_strength needs `model` to name one adapter", param="adapter_strength")
            return self.merged_spec()
        if model in self.strengths:
            return ((model, self.strengths[model] if strength is None else float(strength)),)
        raise not_found(model)

    # ---- adapters at run time -------------------------------------------------------
    async def load_adapter(self, name: str, path: str | None, image: str | None, strength: float | None) -> str:
        if not self.settings.enable_lora_loading:
            raise ApiError(403, "loading adapters at run time is disabled; set enable_lora_loading: true (--enable-lora-loading or KAITO_ENABLE_LORA_LOADING=true)", "PermissionDeniedError")
        if bool(path) == bool(image):  # an empty lora_path would be the server's working directory
            raise ApiError(400, "give exactly one of lora_path (a directory) or image (an adapter image reference), "
                                "not empty", param="lora_path")
        if name in self.base_names():
            raise ApiError(400, f"lora_name {name!r} is the base model's name; choose another", param="lora_name")
        async with self._adapter_lock:
            if name in self.strengths:
                raise ApiError(400, f"adapter {name!r} is already loaded; unload it first", param="lora_name")
            loaded, engine = self.ready_parts()
            if path:
                target = Path(path)
                if not target.is_dir():
                    raise ApiError(404, f"lora_path {path!r}: no such directory on the server", "NotFoundError", "lora_path")
            else:
                target = await asyncio.to_thread(self._pull, name, str(image))
            try:
                adapter = await asyncio.to_thread(read_adapter, target, name, loaded.model)
            except KaitoError as e:
                raise ApiError(400, str(e), param="lora_path") from None
            try:
                await asyncio.to_thread(engine.add_adapter, adapter)
            except (ValueError, KaitoError) as e:  # the adapter does not fit this model
                raise ApiError(400, f"loading adapter {name}: {e}", param="lora_path") from None
            except RuntimeError as e:  # the engine did not run the load: nothing was recorded
                raise ApiError(503, f"loading adapter {name}: {e}", type="ServiceUnavailableError") from None
            self.strengths[name] = float(strength) if strength is not None else adapter_strength(self.settings, name)
            self.metrics.adapter_loads.inc()
            self.metrics.adapters_loaded.set(len(self.strengths))
        return f"Success: LoRA adapter '{name}' added successfully."

    def _pull(self, name: str, image: str) -> Path:
        try:
            from kaito.image_builder import pull
        except ImportError as e:
            raise ApiError(400, f"this server cannot pull adapter images (kaito.image_builder unavailable: {e}); use lora_path",
                           param="image") from None
        dest = Path(self.settings.adapter_pull_root) / f"{name}-{uuid.uuid4().hex[:8]}"
        try:
            # resumable=False: each load pulls into a fresh directory, so a failed pull's staging
            # (.<name>-<uuid>.kaito-partial) would never be reused; it is removed with the failure.
            pull(image, dest, auth_file=self.settings.adapter_pull_auth_file, resumable=False)
        except Exception as e:  # bad reference, unreachable or refusing registry: the caller's input
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, f"pulling adapter image {image!r} failed: {e}", param="image") from None
        if not (dest / ADAPTER_CONFIG_FILE).is_file():
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, f"image {image!r} holds no {ADAPTER_CONFIG_FILE} at its root; is it an adapter image?", param="image")
        return dest

    async def unload_adapter(self, name: str) -> str:
        if not self.settings.enable_lora_loading:
            raise ApiError(403, "unloading adapters at run time is disabled; set enable_lora_loading: true (--enable-lora-loading or KAITO_ENABLE_LORA_LOADING=true)", "PermissionDeniedError")
        async with self._adapter_lock:
            _, engine = self.ready_parts()
            if name not in self.strengths:
                raise ApiError(404, f"adapter {name!r} is not loaded", "NotFoundError", "lora_name")
            del self.strengths[name]  # no new request resolves it, whatever the engine answers
            self.metrics.adapters_loaded.set(len(self.strengths))
            try:
                await asyncio.to_thread(engine.remove_adapter, name)
            except Exception as e:  # the engine did not drop its weights (stopped, or timed out)
                raise ApiError(503, f"unloading adapter {name}: {e}", type="ServiceUnavailableError") from None
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ---- generation ------------------------------------------------------------------
    def check_length(self, prompt_len: int, max_tokens: int | None, what: str = "messages") -> int:
        """Completion budget for a prompt; 400 with the token counts when it cannot fit."""
        limit = self.ready_parts()[0].max_model_len
        if prompt_len >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                           param="messages" if what == "messages" else "prompt")
        if max_tokens is not None:
            if max_tokens > self.settings.max_tokens_cap:
                raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's cap of {self.settings.max_tokens_cap}", param="max_tokens")
            if prompt_len + max_tokens > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                                    f"completion). Please reduce the length of the {what} or completion.", param="max_tokens")
            return max_tokens
        return min(self.settings.default_max_tokens, limit - prompt_len)

    def check_capacity(self, rows: int) -> None:
        """400 for a request of more sequences than the server could ever hold at once (prompts x n): waiting
        would never help, so a 429 would make clients retry forever."""
        try:
            self.ready_parts()[1].check_fits(rows)
        except NeverFits as e:
            raise ApiError(400, str(e), param="n") from None

    def submit(self, prompt_ids: list[int], params: list[SamplingParams], lora: RowSpec) -> tuple[list[Sequence], asyncio.Queue]:
        _, engine = self.ready_parts()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = [Sequence(list(prompt_ids), p, lora=lora, loop=loop, index=i, queue=queue) for i, p in enumerate(params)]
        try:
            engine.submit(seqs)
        except QueueFull as e:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise ApiError(429, f"the server is at capacity ({e}); retry later", "RateLimitError", headers={"Retry-After": "1"}) from None
        except EngineDead:  # it died after require_ready looked: the process is exiting
            raise ApiError(503, "the engine stopped after an internal error; the server is restarting",
                           "ServiceUnavailableError") from None
        except NeverFits as e:  # an empty prompt, or more sequences than the server could ever hold
            raise ApiError(400, str(e), param="n" if prompt_ids else "prompt") from None
        return seqs, queue

    async def events(self, seqs: list[Sequence], queue: asyncio.Queue, disconnected=None) -> AsyncIterator[tuple[int, object]]:
        """Yield (choice index, Token | Finished) until every choice finished; cancel all on exit or disconnect."""
        left = len(seqs)
        checked = time.monotonic()
        try:
            while left:
                if disconnected is None:
                    idx, ev = await queue.get()
                else:
                    try:
                        idx, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        idx, ev = None, None
                    # Tokens may arrive faster than the timeout, so poll by the clock too.
                    if time.monotonic() - checked > 0.25:
                        checked = time.monotonic()
                        if await disconnected():
                            return
                    if ev is None:
                        continue
                # Drain what else is queued: a consumer that fell behind sends one merged chunk, not many.
                pending = [(idx, ev)] + [queue.get_nowait() for _ in range(queue.qsize())]
                for choice, item in _coalesce(pending):
                    if isinstance(item, Finished):
                        left -= 1
                        if item.reason == "error":
                            raise ApiError(500, "generation failed inside the engine; see the server log", "InternalServerError")
                    yield choice, item
        finally:
            if self.engine is not None:  # sequences were submitted to it: it exists
                self.engine.cancel(seqs)


def default_torch_threads(settings: RuntimeSettings, environ=os.environ, cores: int | None = None) -> int | None:
    """torch's CPU threads when nothing chose them (no torch_threads, no OMP_NUM_THREADS) and the model runs
    on CPU: the cores this process may use (its affinity and cgroup quota), minus one left to the HTTP server
    from 4 cores up, as vLLM's CPU build reserves one. On 2 cores both go to the engine's forwards: with one
    forward thread the event loop costs them little, while leaving it a core halves the compute (88M bench
    model, 2 threads against 1: batch-1 step 36 -> 21 ms, 32-row step 83 -> 48 ms; served, 1 client TPOT 33 ->
    23 ms, 32 clients 345 -> 520 tok/s). Under torchrun the cores are shared among the local ranks first.
    None: leave torch's setting."""
    if settings.torch_threads or environ.get("OMP_NUM_THREADS"):
        return None
    from kaito.runtime.loader import resolve_device

    if resolve_device(settings).type != "cpu":
        return None
    # Under torchrun every local rank runs its own forwards: each takes its share of the cores.
    share = max(1, (cores or usable_cores()) // max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1)))
    return share if share <= 3 else share - 1


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (Kubernetes limits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:  # a Kubernetes CPU limit: "quota period" in cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _lower_priority() -> None:
    """Preparation threads yield the CPU to the event loop and the engine (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority, still off the loop
        pass


def _coalesce(items: list) -> list:
    """Merge consecutive text-only Tokens of the same choice (logprob tokens stay one per token)."""
    out: list = []
    for idx, ev in items:
        if (out and isinstance(ev, Token) and ev.logprob is None and out[-1][0] == idx
                and isinstance(out[-1][1], Token) and out[-1][1].logprob is None):
            out[-1] = (idx, Token(ev.token_id, out[-1][1].text + ev.text))
        else:
            out.append((idx, ev))
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


__all__ = ["ApiError", "Finished", "Runtime", "Token", "new_id", "not_found", "now"]
