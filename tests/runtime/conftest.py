"""Runtime test fixtures: peft adapters on the tiny model, in-process apps and real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from kaito.runtime.api import build_app
from kaito.runtime.settings import RuntimeSettings


@pytest.fixture(scope="module")
def glue():
    """The C glue built threaded (OpenMP, sharing torch's libgomp): the C step and greedy runs need it."""
    from kaito.runtime import cglue

    g = cglue.load()
    assert g is not None and g.threaded, "the C glue did not build with OpenMP: is gcc installed? (CI installs it)"
    return g


def make_adapter(model_dir: Path, dest: Path, seed: int, r: int = 4, alpha: int = 8,
                 targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")) -> Path:
    """A real peft LoRA on the tiny model with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():  # make the delta large enough to move greedy tokens
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    peft_model.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_model_dir, d / "alpha", seed=1)
    make_adapter(tiny_model_dir, d / "beta", seed=2, r=2, alpha=4, targets=("qkv_proj", "down_proj"))
    return d


@pytest.fixture(scope="session")
def spare_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("spare") / "gamma", seed=3)


def settings_for(model_dir: Path, adapters: Path | None = None, **kw) -> RuntimeSettings:
    kw.setdefault("enable_lora_loading", True)
    return RuntimeSettings(model_dir=model_dir, preset="tiny-phi-3", adapters_dir=adapters or (model_dir / "no-adapters"),
                           host="127.0.0.1", **kw)


@contextlib.asynccontextmanager
async def asgi_client(settings: RuntimeSettings, ready_s: float = 60):
    """The app in-process (fast): lifespan run, model loaded, httpx client on it."""
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(app.state.runtime.ready.wait, ready_s)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            client.app = app
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a thread (stopped by the fixture)."""

    def __init__(self, settings: RuntimeSettings):
        import uvicorn

        self.port = free_port()
        self.app = build_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def runtime(self):
        return self.app.state.runtime


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, adapters_dir):
    with LiveServer(settings_for(tiny_model_dir, adapters_dir, max_batch_size=8)) as srv:
        yield srv


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest
