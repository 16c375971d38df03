"""`kaito image ...`: build, push, pull and inspect Kaito images (plugged in through the `kaito.cli` entry point).

One verb per command, each a few lines over kaito.image_builder; the options
several commands share (registry access, output, upload pacing) are declared
once in `SHARED` and reach a command as one `Shared` value. The operator's init
containers run `kaito image pull <ref> <dir>`; keep that shape.
Exit codes come from the root CLI: InvalidInput -> 2, other KaitoError -> 1.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from kaito.presets.errors import InvalidInput, KaitoError


def _guarded(fn):
    """Commands report file-system failures (permissions, full disk) as KaitoError, naming the file."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise KaitoError(
                f"kaito image {fn.__name__.removesuffix('_cmd').replace('_', '-')}: {e.strerror or e}{where}"
            ) from None

    return wrapper


app = typer.Typer(help="Build, push, pull and inspect Kaito OCI images and ModelPack artifacts.", no_args_is_help=True)

# The options several commands share: (type, typer option), declared once and added by `_shared`.
SHARED: dict[str, tuple[Any, Any]] = {
    "limit_rate": (Optional[str], typer.Option(None, "--limit-rate", help="cap upload speed, e.g. 50M (bytes/s)")),
    "chunk_size": (
        Optional[str],
        typer.Option(None, "--chunk-size", help="upload chunk (resume granularity), e.g. 64M"),
    ),
    "auth_file": (
        Optional[Path],
        typer.Option(None, "--auth-file", help="docker config.json or a dockerconfigjson Secret file"),
    ),
    "insecure": (
        Optional[bool],
        typer.Option(None, "--insecure/--secure", help="plain http (loopback registries use http by default)"),
    ),
    "jobs": (int, typer.Option(4, "--jobs", "-j", min=1, max=64, help="parallel blob transfers")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="no progress bars")),
    "as_json": (bool, typer.Option(False, "--json", help="print the result as JSON")),
}


def _byte_count(text: str, field: str) -> float:
    """`text` as a byte count: a number with an optional k/m/g/t suffix (binary units), 50M or 800k."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().rstrip("b").rstrip("i")
    try:
        n = float(s[:-1]) * units[s[-1]] if s[-1] in units else float(s)
    except (ValueError, IndexError):
        n = math.nan
    if not (math.isfinite(n) and n >= 0):  # float() also takes "-5", "nan" and "inf"
        raise InvalidInput(f"{field} {text!r}: use a byte count such as 50M or 800k")
    return n


def _rate(limit: Optional[str], field: str = "--limit-rate") -> Optional[float]:
    return _byte_count(limit, field) if limit else None


@dataclass(frozen=True)
class Shared:
    """The shared options one command was given (those it does not take keep their defaults)."""

    auth_file: Optional[Path] = None
    insecure: Optional[bool] = None
    jobs: int = 4
    quiet: bool = False
    as_json: bool = False
    limit_rate: Optional[str] = None
    chunk_size: Optional[str] = None

    def progress(self):
        """Progress bars on stderr, or none with --quiet or --json (stdout then carries only the result)."""
        from kaito.image_builder.oci.progress import NULL

        if self.quiet or self.as_json:
            return NULL
        from kaito.image_builder.progress import RichProgress

        return RichProgress()

    def push_kw(self) -> dict:
        """--limit-rate and --chunk-size as the keyword arguments of `write_image`."""
        kw: dict[str, Any] = {"rate_limit": _rate(self.limit_rate)}
        if self.chunk_size:
            kw["chunk_size"] = int(_byte_count(self.chunk_size, "--chunk-size"))
        return kw

    def emit(self, result: Any, fields: Optional[tuple[str, ...]], line: str) -> None:
        """Print the result: `fields` of it (all of `result.to_json()` when None) as JSON, or `line`,
        or with --quiet only its digest."""
        data = result.to_json() if fields is None else {f: getattr(result, f) for f in fields}
        if self.as_json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif not self.quiet:
            typer.echo(line)
        else:
            typer.echo(data.get("digest", ""))


def _shared(*names: str) -> Callable:
    """Give a command the shared options `names`: typer sees them in its signature, the command one `opts`.

    The command declares `opts: Shared` last; its own parameters come first, as typer lists them.
    """

    def deco(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "opts"]
        added = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=SHARED[n][1], annotation=SHARED[n][0])
            for n in names
        ]

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            return fn(*a, opts=Shared(**{n: kw.pop(n) for n in names}), **kw)

        params = own + added
        # typer reads the options from the signature; functools.wraps' type does not declare the attribute.
        wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return deco


@app.command("build-preset")
@_guarded
@_shared("limit_rate", "chunk_size", "auth_file", "insecure", "jobs", "quiet", "as_json")
def build_preset_cmd(
    preset: str = typer.Argument(..., help="preset name or alias, e.g. phi-3-mini-4k-instruct"),
    registry: Optional[str] = typer.Option(
        None,
        "--registry",
        "-r",
        envvar="REGISTRY",
        help="registry host (with optional path) or a layout directory (default ./out/registry)",
    ),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="image tag (default: the preset's image_tag)"),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="weights directory (default: the preset's weight source)"
    ),
    base: Optional[str] = typer.Option(None, "--base", envvar="KAITO_BASE_IMAGE", help="base runtime image reference"),
    weights_only: bool = typer.Option(
        False, "--weights-only", help="no runtime base: an image of weight layers only (it cannot serve)"
    ),
    no_modelpack: bool = typer.Option(False, "--no-modelpack", help="skip the ModelPack artifact"),
    *,
    opts: Shared,
) -> None:
    """Build a preset image (base + one layer per model file) and its ModelPack artifact `kaito-<preset>-weights`.

    The base is --base / KAITO_BASE_IMAGE, else <registry>/kaito-base:<version>, else
    out/registry/kaito-base:<version> (what `make build-base` writes); none found is an error.

    Example: kaito image build-preset tiny-phi-3 --registry 127.0.0.1:5000 --tag 0.1.0
    """
    from kaito.image_builder.build import build_preset, resolve_base
    from kaito.image_builder.transfer import Connection
    from kaito.presets import get_preset

    if weights_only and base:
        raise InvalidInput("--weights-only and --base (or KAITO_BASE_IMAGE) exclude each other; pass one")
    get_preset(preset)  # an unknown preset is the first thing to report, before looking for a base
    if not weights_only:  # by default a preset image serves: weights on the runtime base
        with Connection(opts.auth_file, opts.insecure) as conn:
            base = resolve_base(base, registry, conn)
    with opts.progress() as prog:
        r = build_preset(
            preset,
            registry,
            tag=tag,
            weights_dir=weights,
            base=base,
            modelpack=not no_modelpack,
            auth_file=opts.auth_file,
            insecure=opts.insecure,
            jobs=opts.jobs,
            progress=prog,
            **opts.push_kw(),
        )
    base_note = f"on {r.base}" if r.base else "weights only (--weights-only): it cannot serve"
    opts.emit(
        r,
        None,
        f"built {r.ref}@{r.digest} ({base_note})\n  modelpack {r.modelpack_ref}@{r.modelpack_digest}\n"
        f"  uploaded {r.bytes_uploaded} bytes",
    )


@app.command("build-adapter")
@_guarded
@_shared("auth_file", "insecure", "quiet", "as_json")
def build_adapter_cmd(
    adapter_dir: Path = typer.Argument(..., help="directory with adapter_config.json and adapter_model.safetensors"),
    ref: str = typer.Argument(..., help="destination, e.g. 127.0.0.1:5000/adapters/my-adapter:v1 or oci:DIR:TAG"),
    preset: Optional[str] = typer.Option(None, "--preset", help="base preset (annotation sh.kaito.model.name)"),
    *,
    opts: Shared,
) -> None:
    """Push a LoRA adapter as Kaito's adapter image (/data/adapter_config.json, /data/adapter_model.safetensors).

    Example: kaito image build-adapter ./out/adapter 127.0.0.1:5000/adapters/phi-3-lora:v1 --preset phi-3-mini-4k-instruct
    """
    from kaito.image_builder.build import build_adapter

    with opts.progress() as prog:
        r = build_adapter(
            adapter_dir, ref, preset_name=preset, auth_file=opts.auth_file, insecure=opts.insecure, progress=prog
        )
    fields = ("ref", "digest", "size", "bytes_uploaded")
    opts.emit(r, fields, f"pushed {r.ref}@{r.digest} ({r.bytes_uploaded} bytes uploaded)")


@app.command("pull")
@_guarded
@_shared("auth_file", "insecure", "jobs", "quiet", "as_json")
def pull_cmd(
    ref: str = typer.Argument(..., help="image or ModelPack reference (registry or oci:DIR:TAG)"),
    dest: Path = typer.Argument(..., help="directory to create (or an empty mount point)"),
    rootfs: bool = typer.Option(False, "--rootfs", help="extract every layer as-is instead of the model content"),
    force: bool = typer.Option(False, "--force", help="replace DEST if it holds something else"),
    max_bytes: Optional[str] = typer.Option(
        None, "--max-bytes", help="most file bytes to write, e.g. 2T (default 1T; env KAITO_PULL_MAX_BYTES)"
    ),
    max_ratio: Optional[float] = typer.Option(
        None, "--max-ratio", min=1, help="largest expansion of a compressed layer (default 100; KAITO_PULL_MAX_RATIO)"
    ),
    *,
    opts: Shared,
) -> None:
    """Pull an image into DIR: an adapter's files, or a preset's weights, directly in DIR (atomically).

    Example: kaito image pull 127.0.0.1:5000/kaito-tiny-phi-3-weights:0.1.0 /workspace/weights
    """
    from kaito.image_builder.oci.extract import ExtractLimits
    from kaito.image_builder.pull import pull

    limit = int(_byte_count(max_bytes, "--max-bytes")) if max_bytes else None
    limits = ExtractLimits.from_env(max_bytes=limit, max_ratio=max_ratio)
    with opts.progress() as prog:
        r = pull(
            ref,
            dest,
            auth_file=opts.auth_file,
            insecure=opts.insecure,
            full=rootfs,
            jobs=opts.jobs,
            progress=prog,
            overwrite=force,
            limits=limits,
        )
    fields = ("ref", "digest", "dest", "files", "bytes_downloaded", "up_to_date")
    done = "up to date" if r.up_to_date else "pulled"
    opts.emit(r, fields, f"{done} {r.ref}@{r.digest} into {r.dest} ({len(r.files)} files)")


@app.command("inspect")
@_guarded
@_shared("auth_file", "insecure")
def inspect_cmd(
    ref: str = typer.Argument(..., help="image reference (registry or oci:DIR:TAG)"),
    *,
    opts: Shared,
) -> None:
    """Print an image's manifest facts as JSON (digest, annotations, layers).

    Example: kaito image inspect oci:out/registry/kaito-tiny-phi-3:0.1.0
    """
    from kaito.image_builder.transfer import Connection, inspect

    with Connection(opts.auth_file, opts.insecure) as conn:
        typer.echo(json.dumps(inspect(ref, conn), indent=2, sort_keys=True))


@app.command("copy")
@_guarded
@_shared("limit_rate", "chunk_size", "auth_file", "insecure", "jobs", "quiet", "as_json")
def copy_cmd(
    src: str = typer.Argument(..., help="source reference"),
    dst: str = typer.Argument(..., help="destination reference (tag)"),
    *,
    opts: Shared,
) -> None:
    """Copy an image between layouts and registries, digest unchanged (e.g. push a layout-built image).

    Example: kaito image copy oci:out/registry/kaito-tiny-phi-3:0.1.0 myregistry.io/kaito/kaito-tiny-phi-3:0.1.0
    """
    from kaito.image_builder.transfer import Connection, copy

    with opts.progress() as prog, Connection(opts.auth_file, opts.insecure) as conn:
        r = copy(src, dst, conn, jobs=opts.jobs, progress=prog, **opts.push_kw())
    fields = ("ref", "digest", "bytes_uploaded", "resumed", "skipped", "mounted")
    opts.emit(r, fields, f"copied to {r.ref}@{r.digest} ({r.bytes_uploaded} bytes uploaded)")


@app.command("build-base")
@_guarded
def build_base_cmd(
    ref: str = typer.Argument(..., help="where to push the base image, e.g. 127.0.0.1:5000/kaito-base:0.1.0"),
    dockerfile: str = typer.Option("base", "--dockerfile", help="Dockerfiles/<name> to build"),
    context: Optional[Path] = typer.Option(None, "--context", help="build context (default: the project)"),
    torch_variant: str = typer.Option("cpu", "--torch", help="cpu or a CUDA tag such as cu124"),
    docker_host: Optional[str] = typer.Option(None, "--docker-host", envvar="DOCKER_HOST", help="daemon socket"),
    push: bool = typer.Option(True, "--push/--no-push", help="push the built image to REF"),
    build_arg: list[str] = typer.Option([], "--build-arg", help="KEY=VALUE passed to the Dockerfile (repeatable)"),
    network: Optional[str] = typer.Option(
        None, "--network", help="build network mode, e.g. none for a bridgeless daemon"
    ),
) -> None:
    """Build Dockerfiles/<name> with a docker daemon (docker SDK) and push it.

    Example: kaito image build-base 127.0.0.1:5000/kaito-base:0.1.0 --docker-host unix:///tmp/d/docker.sock
    """
    from kaito.image_builder.docker_build import build_dockerfile

    args = {} if torch_variant == "cpu" else {"TORCH_INDEX_URL": f"https://download.pytorch.org/whl/{torch_variant}"}
    for kv in build_arg:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--build-arg {kv!r} must be KEY=VALUE")
        args[key] = value
    r = build_dockerfile(
        dockerfile, ref, context=context, docker_host=docker_host, buildargs=args, push=push, network_mode=network
    )
    typer.echo(f"built {ref} ({r['id']})" + (f", pushed {r.get('digest')}" if push else ""))
