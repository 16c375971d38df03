"""`kaito tune` and `python -m kaito.tuning`: the tuning Job's commands.

Called by the `kaito` root CLI through the `kaito.cli` entry point
(`register(app)` adds `tune`) and by `kaito/tuning/__main__.py`. The operator
renders these exact forms into the tuning Job:

    kaito tune fetch-data --dest /mnt/data URL...              # init container
    python -m kaito.tuning --config /mnt/config/training_config.yaml --preset NAME --method qlora \
        --data /mnt/data --output /mnt/results [--push REF --push-secret /var/run/secrets/kaito/docker/config.json]

Heavy libraries (torch, transformers, peft) are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from kaito.presets.errors import InvalidInput

tune_app = typer.Typer(
    help="Fine-tune a preset with LoRA/QLoRA and publish the adapter as an image.\n\n"
    "Example: kaito tune --preset tiny-phi-3 --method qlora --data ./data --output ./results",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _logging() -> None:
    """Logs go to stderr so that stdout carries only the JSON result (`kaito tune ... | jq`)."""
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    # httpx logs every request URL at INFO, upload-session tokens (`_state=`) included.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@tune_app.callback()
def tune(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", help="training_config.yaml (Kaito's format); default: Kaito's config for --method"
    ),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset name, e.g. phi-3-mini-128k-instruct"),
    method: str = typer.Option("qlora", "--method", help="lora or qlora"),
    data: List[str] = typer.Option([], "--data", help="Data dir, http(s) URL (repeatable) or image:REF"),
    output: Optional[Path] = typer.Option(None, "--output", help="Results root (Kaito: /mnt/results)"),
    model_dir: Optional[Path] = typer.Option(
        None, "--model-dir", help="Base model weights; default /workspace/weights (the preset image)"
    ),
    push: Optional[str] = typer.Option(None, "--push", help="Push the adapter as this image reference"),
    push_secret: Optional[Path] = typer.Option(None, "--push-secret", help="dockerconfigjson with push credentials"),
) -> None:
    """Train (resuming after a kill), write the adapter, and push it when --push is given."""
    if ctx.invoked_subcommand is not None:
        return
    if not (preset and data and output):
        missing = [f for f, v in (("--preset", preset), ("--data", data), ("--output", output)) if not v]
        raise InvalidInput(f"kaito tune: missing {', '.join(missing)} (see kaito tune --help)")
    _logging()
    from kaito.tuning.trainer import run_tuning

    # Libraries print progress to stdout (Trainer's log dicts, accelerate); only
    # the JSON summary below belongs there.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_tuning(
            preset=preset, method=method, data=data, output=output, config=config, model_dir=model_dir,
            push=push, push_secret=push_secret,
        )
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per job, not per DDP rank
        typer.echo(json.dumps(summary, default=str))


@tune_app.command("fetch-data")
def fetch_data(
    urls: List[str] = typer.Argument(..., help="http(s) URLs, or one image:REF"),
    dest: Path = typer.Option(..., "--dest", help="Directory to fill (Kaito: /mnt/data)"),
    parallel: int = typer.Option(4, "--parallel", help="Concurrent downloads"),
    retries: int = typer.Option(5, "--retries", help="Retries per URL (exponential backoff)"),
    max_bytes: int = typer.Option(50 * 1024**3, "--max-bytes", help="Size limit per file"),
    auth_file: Optional[Path] = typer.Option(None, "--auth-file", help="dockerconfigjson for image:REF pulls"),
) -> None:
    """Download training data into --dest (resumes partial files after a kill).

    Example: kaito tune fetch-data --dest /mnt/data https://host/train.parquet
    """
    from kaito.tuning.fetch import fetch_urls, image_ref, pull_image

    ref = image_ref(urls[0]) if len(urls) == 1 and not urls[0].startswith(("http://", "https://")) else None
    if ref:
        pull_image(ref, dest, auth_file=auth_file)
    else:
        files = fetch_urls(urls, dest, parallel=parallel, retries=retries, max_bytes=max_bytes,
                           show_progress=sys.stderr.isatty())
        for f in files:
            typer.echo(f"{f} {f.stat().st_size} bytes")


def register(app: typer.Typer) -> None:
    """Entry point `kaito.cli:tune`: adds `kaito tune` to the root CLI."""
    app.add_typer(tune_app, name="tune")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m kaito.tuning`: same flags as `kaito tune`; exit 2 bad input, 1 failure."""
    from kaito.presets.cli import invoke

    return invoke(tune_app, argv, prog_name="python -m kaito.tuning")
