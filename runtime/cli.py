"""`kaito serve`: the inference server as a subcommand of the root `kaito` CLI.

Registered through the `kaito.cli` entry point (`register(app)`), called by
`kaito.presets.cli`. Same flags as `python -m kaito.runtime`; heavy imports
(torch, transformers, fastapi) happen inside the command only.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        preset: str | None = typer.Option(None, help="Preset name (kaito presets list)."),
        model_dir: Path | None = typer.Option(None, help="Weights directory (default /workspace/weights)."),
        adapters_dir: Path | None = typer.Option(None, help="Adapters directory (default /mnt/adapter)."),
        port: int | None = typer.Option(None, help="Base port (default 5000; + LOCAL_RANK)."),
        host: str | None = typer.Option(None, help="Bind address (default 0.0.0.0)."),
        config: Path | None = typer.Option(None, help="YAML of settings (keys = setting names, optionally under 'runtime:')."),
        dtype: str | None = typer.Option(None, help="auto|float32|bfloat16|float16."),
        device: str | None = typer.Option(None, help="auto|cpu|cuda|cuda:N."),
        served_model_name: str | None = typer.Option(None, help="Model id clients send."),
        max_batch_size: int | None = typer.Option(None, help="Sequences decoded together."),
        max_waiting: int | None = typer.Option(None, help="Queue size before 429."),
        max_model_len: int | None = typer.Option(None, help="Context length enforced."),
        chat_template: str | None = typer.Option(None, help="Chat template file or inline Jinja."),
        enable_lora_loading: bool | None = typer.Option(None, "--enable-lora-loading", help="Allow loading/unloading adapters at run time."),
    ) -> None:
        """Serve a model over Kaito's /chat and the OpenAI API (see `python -m kaito.runtime --help` for torchrun use)."""
        from kaito.runtime.launch import serve as run
        from kaito.runtime.settings import load_settings

        overrides = dict(preset=preset, model_dir=model_dir, adapters_dir=adapters_dir, port=port, host=host, dtype=dtype,
                         device=device, served_model_name=served_model_name, max_batch_size=max_batch_size,
                         max_waiting=max_waiting, max_model_len=max_model_len, chat_template=chat_template,
                         enable_lora_loading=enable_lora_loading)
        run(load_settings(overrides, config))
