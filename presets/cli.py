"""The `kaito` command: root CLI plus the `kaito presets` group.

Entry point of the `kaito` console script. The other packages plug their
command groups in through the `kaito.cli` entry-point group (see
pyproject.toml): a value is either a `typer.Typer` (added as a sub-command
group under the entry point's name) or a callable `register(app)` that adds
its own commands. Plugins are imported when the CLI starts, so their modules
must import heavy libraries (torch, transformers, kopf) inside commands only.
Exit codes: 0 ok, 2 bad input (`InvalidInput`, usage errors), 1 failure.
Streams: a command's result goes to stdout, everything else (logs, progress,
errors) to stderr, so `kaito ... | jq` reads only the result; logging is set
up once here (`configure_logging`) for every command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.registry import get_preset, list_presets
from kaito.presets.skus import fit, get_sku, smallest_fit
from kaito.presets.spec import PresetSpec

console = Console(soft_wrap=True)  # results: never hard-wrapped at 80 columns when piped
# soft_wrap: an error is one line however narrow the terminal, so scripts can match it.
err_console = Console(stderr=True, soft_wrap=True)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every HTTP request at INFO (with upload URLs carrying session tokens).
QUIET_LOGGERS = ("httpx", "httpcore", "huggingface_hub", "urllib3", "filelock")

app = typer.Typer(
    name="kaito",
    help="Kaito: serve and fine-tune open LLMs on Kubernetes GPU nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
presets_app = typer.Typer(
    help="List, inspect and size the model presets.\n\nExample: kaito presets show phi-3-mini -o yaml",
    no_args_is_help=True,
)
app.add_typer(presets_app, name="presets")


def _fmt_gib(v: float) -> str:
    return f"{v:g}"


@presets_app.command("list")
def presets_list(
    output: str = typer.Option("table", "-o", "--output", help="table, json or yaml"),
) -> None:
    """List every preset with its GPU needs.

    Example: kaito presets list -o json
    """
    presets = list_presets()
    if output in ("json", "yaml"):
        rows = [p.model_dump(mode="json") for p in presets]
        typer.echo(json.dumps(rows, indent=2) if output == "json" else yaml.safe_dump(rows, sort_keys=False))
        return
    if output != "table":
        raise InvalidInput(f"--output {output!r} is not one of table, json, yaml")
    t = Table(title=f"Kaito presets ({len(presets)})")
    for col in ("NAME", "FAMILY", "GPUS", "TOTAL GiB", "PER-GPU GiB", "DISK", "TUNING", "SMALLEST AZURE SKU"):
        t.add_column(col)
    for p in presets:
        try:
            sku = smallest_fit(p).name
        except InvalidInput:
            sku = "-"
        tuning = ", ".join(f"{m}:{_fmt_gib(p.tuning_memory_gib[m])}" for m in sorted(p.tuning_memory_gib, key=str)) or "-"
        t.add_row(
            p.name + (f" ({', '.join(p.aliases)})" if p.aliases else ""),
            p.family,
            str(p.gpu.gpu_count),
            _fmt_gib(p.gpu.total_gpu_memory_gib),
            _fmt_gib(p.gpu.per_gpu_memory_gib),
            f"{p.disk}Gi",
            tuning.replace("TuningMethod.", ""),
            sku,
        )
    console.print(t)


def _dump(p: PresetSpec) -> dict:
    d = p.model_dump(mode="json")
    d["disk_gib"] = p.disk
    return d


@presets_app.command("show")
def presets_show(
    name: str = typer.Argument(..., help="Preset name or alias"),
    output: str = typer.Option("yaml", "-o", "--output", help="yaml or json"),
) -> None:
    """Show one preset in full.

    Example: kaito presets show phi-3-mini-4k-instruct -o json
    """
    p = get_preset(name)
    if output == "json":
        typer.echo(json.dumps(_dump(p), indent=2))
    elif output == "yaml":
        typer.echo(yaml.safe_dump(_dump(p), sort_keys=False).rstrip())
    else:
        raise InvalidInput(f"--output {output!r} is not one of yaml, json")


@presets_app.command("fit")
def presets_fit(
    name: str = typer.Argument(..., help="Preset name or alias"),
    instance_type: str = typer.Option(..., "--instance-type", "-i", help="GPU SKU, e.g. Standard_NC6s_v3"),
    count: int = typer.Option(1, "--count", "-c", help="Number of nodes"),
) -> None:
    """Check whether COUNT nodes of a GPU SKU can serve a preset (Kaito's three rules).

    Example: kaito presets fit falcon-40b-instruct --instance-type Standard_NC6s_v3 --count 2
    Exits 0 when it fits, 1 when it does not (the failing rule and SKUs that fit are printed).
    """
    result = fit(get_preset(name), get_sku(instance_type), count)
    if result.ok:
        console.print(f"[green]OK[/green] {result.message}")
        return
    err_console.print(f"[red]does not fit[/red] (rule {result.rule}): {result.message}")
    raise typer.Exit(1)


@presets_app.command("make-tiny")
def presets_make_tiny(
    dest: Path = typer.Argument(..., help="Directory to write the model into"),
    size: str = typer.Option("tiny", "--size", help="tiny (tests, <2 MB) or small (benchmarks, ~4M params)"),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed gives byte-identical files"),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it exists"),
) -> None:
    """Generate a random-initialised Phi-3 with a locally trained tokenizer, fully offline.

    Example: kaito presets make-tiny ./weights --size small
    """
    from kaito.presets.tiny import make_tiny

    out = make_tiny(dest, size=size, seed=seed, overwrite=force)
    console.print(f"wrote tiny Phi-3 ({size}) to {out}")


@presets_app.command("weights")
def presets_weights(
    name: str = typer.Argument(..., help="Preset name or alias"),
    dest: Path = typer.Argument(..., help="Directory to create with the weights"),
    source: Optional[str] = typer.Option(
        None, "--from", help="Local directory to copy from; default: the hub at the pinned revision (or the tiny factory)"
    ),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it exists"),
) -> None:
    """Produce a preset's weights directory (safetensors only).

    Example: kaito presets weights tiny-phi-3 ./weights
    """
    from kaito.presets.weights import materialize_weights

    out = materialize_weights(get_preset(name), dest, source=source, overwrite=force)
    console.print(f"weights for {name} in {out}")


def _load_plugins() -> None:
    for ep in sorted(entry_points(group="kaito.cli"), key=lambda e: e.name):
        try:
            obj = ep.load()
        except ImportError as e:
            # An image without that extra (e.g. the operator image has no torch)
            # still gets a clear message instead of a missing command.
            missing = str(e)

            def _unavailable(missing: str = missing, name: str = ep.name) -> None:
                raise KaitoError(f"'kaito {name}' is not available in this install: {missing}")

            app.command(ep.name, help=f"(unavailable here: {missing})")(_unavailable)
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            obj(app)


def configure_logging() -> None:
    """Send all logging to stderr at KAITO_LOG_LEVEL (default INFO); request-per-line libraries at WARNING.

    Idempotent; a command may still change the root level (`kaito operator run -v`).
    """
    root = logging.getLogger()
    if not any(getattr(h, "_kaito", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._kaito = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    level = os.environ.get("KAITO_LOG_LEVEL", "INFO").upper()
    root.setLevel(level if level in logging._nameToLevel else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def invoke(typer_app: typer.Typer, argv: Optional[list[str]] = None, prog_name: Optional[str] = None) -> int:
    """Run a typer app and map kaito's errors to exit codes (0 ok, 2 bad input, 1 failure).

    Shared by the `kaito` root and the packages' own `python -m` entry points.
    """
    configure_logging()
    try:
        rv = typer_app(args=argv, prog_name=prog_name, standalone_mode=False)
        if isinstance(rv, int):  # click returns typer.Exit's code when not standalone
            return rv
    except InvalidInput as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 2
    except KaitoError as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 1
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 1
    except typer.TyperException as e:
        # Usage errors from typer's vendored click (ClickException, a TyperException): print them as click would.
        show = getattr(e, "show", None)
        if show is None:
            raise
        show()
        return e.exit_code
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    _load_plugins()
    return invoke(app, argv, prog_name="kaito")


def run() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
