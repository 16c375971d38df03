"""`kaito image ...`: build, push, pull and inspect Kaito images (plugged in through the `kaito.cli` entry point).

One verb per command, each a few lines over kaito.image_builder. The
operator's init containers run `kaito image pull <ref> <dir>`; keep that shape.
Exit codes come from the root CLI: InvalidInput -> 2, other KaitoError -> 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kaito.presets.errors import InvalidInput, KaitoError


def _guarded(fn):
    """Commands report file-system failures (permissions, full disk) as KaitoError, naming the file."""
    import functools

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

AUTH = typer.Option(None, "--auth-file", help="docker config.json or a dockerconfigjson Secret file")
INSECURE = typer.Option(None, "--insecure/--secure", help="plain http (loopback registries use http by default)")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress bars")
JSON = typer.Option(False, "--json", help="print the result as JSON")
JOBS = typer.Option(4, "--jobs", "-j", min=1, max=64, help="parallel blob transfers")


def _progress(quiet: bool, as_json: bool):
    from kaito.image_builder.oci.progress import NULL

    if quiet or as_json:
        return NULL
    from kaito.image_builder.progress import RichProgress

    return RichProgress()


def _emit(result: dict, as_json: bool, quiet: bool, line: str) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif not quiet:
        typer.echo(line)
    else:
        typer.echo(result.get("digest", ""))


def _rate(limit: Optional[str], field: str = "--limit-rate") -> Optional[float]:
    if not limit:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = limit.strip().lower().rstrip("b").rstrip("i")
    try:
        return float(s[:-1]) * units[s[-1]] if s[-1] in units else float(s)
    except (ValueError, IndexError):
        raise InvalidInput(f"{field} {limit!r}: use a byte count such as 50M or 800k") from None


@app.command("build-preset")
@_guarded
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
    limit_rate: Optional[str] = typer.Option(None, "--limit-rate", help="cap upload speed, e.g. 50M (bytes/s)"),
    chunk_size: Optional[str] = typer.Option(None, "--chunk-size", help="upload chunk (resume granularity), e.g. 256M"),
    auth_file: Optional[Path] = AUTH,
    insecure: Optional[bool] = INSECURE,
    jobs: int = JOBS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
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
        with Connection(auth_file, insecure) as conn:
            base = resolve_base(base, registry, conn)
    with _progress(quiet, as_json) as prog:
        r = build_preset(
            preset,
            registry,
            tag=tag,
            weights_dir=weights,
            base=base,
            modelpack=not no_modelpack,
            auth_file=auth_file,
            insecure=insecure,
            jobs=jobs,
            progress=prog,
            rate_limit=_rate(limit_rate),
            **({"chunk_size": int(_rate(chunk_size, "--chunk-size"))} if chunk_size else {}),
        )
    base_note = f"on {r.base}" if r.base else "weights only (--weights-only): it cannot serve"
    _emit(
        r.to_json(),
        as_json,
        quiet,
        f"built {r.ref}@{r.digest} ({base_note})\n  modelpack {r.modelpack_ref}@{r.modelpack_digest}\n"
        f"  uploaded {r.bytes_uploaded} bytes",
    )


@app.command("build-adapter")
@_guarded
def build_adapter_cmd(
    adapter_dir: Path = typer.Argument(..., help="directory with adapter_config.json and adapter_model.safetensors"),
    ref: str = typer.Argument(..., help="destination, e.g. 127.0.0.1:5000/adapters/my-adapter:v1 or oci:DIR:TAG"),
    preset: Optional[str] = typer.Option(None, "--preset", help="base preset (annotation sh.kaito.model.name)"),
    auth_file: Optional[Path] = AUTH,
    insecure: Optional[bool] = INSECURE,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Push a LoRA adapter as Kaito's adapter image (/data/adapter_config.json, /data/adapter_model.safetensors).

    Example: kaito image build-adapter ./out/adapter 127.0.0.1:5000/adapters/phi-3-lora:v1 --preset phi-3-mini-4k-instruct
    """
    from kaito.image_builder.build import build_adapter

    with _progress(quiet, as_json) as prog:
        r = build_adapter(adapter_dir, ref, preset_name=preset, auth_file=auth_file, insecure=insecure, progress=prog)
    _emit(
        {"ref": r.ref, "digest": r.digest, "size": r.size, "bytes_uploaded": r.bytes_uploaded},
        as_json,
        quiet,
        f"pushed {r.ref}@{r.digest} ({r.bytes_uploaded} bytes uploaded)",
    )


@app.command("pull")
@_guarded
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
    auth_file: Optional[Path] = AUTH,
    insecure: Optional[bool] = INSECURE,
    jobs: int = JOBS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Pull an image into DIR: an adapter's files, or a preset's weights, directly in DIR (atomically).

    Example: kaito image pull 127.0.0.1:5000/kaito-tiny-phi-3-weights:0.1.0 /workspace/weights
    """
    from kaito.image_builder.oci.extract import ExtractLimits
    from kaito.image_builder.pull import pull

    limit = int(_rate(max_bytes, "--max-bytes")) if max_bytes else None
    limits = ExtractLimits.from_env(max_bytes=limit, max_ratio=max_ratio)
    with _progress(quiet, as_json) as prog:
        r = pull(
            ref, dest, auth_file=auth_file, insecure=insecure, full=rootfs, jobs=jobs, progress=prog, overwrite=force,
            limits=limits,
        )
    _emit(
        {
            "ref": r.ref,
            "digest": r.digest,
            "dest": str(r.dest),
            "files": list(r.files),
            "bytes_downloaded": r.bytes_downloaded,
            "up_to_date": r.up_to_date,
        },
        as_json,
        quiet,
        f"{'up to date' if r.up_to_date else 'pulled'} {r.ref}@{r.digest} into {r.dest} ({len(r.files)} files)",
    )


@app.command("inspect")
@_guarded
def inspect_cmd(
    ref: str = typer.Argument(..., help="image reference (registry or oci:DIR:TAG)"),
    auth_file: Optional[Path] = AUTH,
    insecure: Optional[bool] = INSECURE,
) -> None:
    """Print an image's manifest facts as JSON (digest, annotations, layers).

    Example: kaito image inspect oci:out/registry/kaito-tiny-phi-3:0.1.0
    """
    from kaito.image_builder.transfer import Connection, inspect

    with Connection(auth_file, insecure) as conn:
        typer.echo(json.dumps(inspect(ref, conn), indent=2, sort_keys=True))


@app.command("copy")
@_guarded
def copy_cmd(
    src: str = typer.Argument(..., help="source reference"),
    dst: str = typer.Argument(..., help="destination reference (tag)"),
    limit_rate: Optional[str] = typer.Option(None, "--limit-rate", help="cap upload speed, e.g. 50M (bytes/s)"),
    chunk_size: Optional[str] = typer.Option(None, "--chunk-size", help="upload chunk (resume granularity), e.g. 64M"),
    auth_file: Optional[Path] = AUTH,
    insecure: Optional[bool] = INSECURE,
    jobs: int = JOBS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Copy an image between layouts and registries, digest unchanged (e.g. push a layout-built image).

    Example: kaito image copy oci:out/registry/kaito-tiny-phi-3:0.1.0 myregistry.io/kaito/kaito-tiny-phi-3:0.1.0
    """
    from kaito.image_builder.transfer import Connection, copy

    with _progress(quiet, as_json) as prog, Connection(auth_file, insecure) as conn:
        kw = {"chunk_size": int(_rate(chunk_size, "--chunk-size"))} if chunk_size else {}
        r = copy(src, dst, conn, jobs=jobs, progress=prog, rate_limit=_rate(limit_rate), **kw)
    _emit(
        {
            "ref": r.ref,
            "digest": r.digest,
            "bytes_uploaded": r.bytes_uploaded,
            "resumed": list(r.resumed),
            "skipped": list(r.skipped),
            "mounted": list(r.mounted),
        },
        as_json,
        quiet,
        f"copied to {r.ref}@{r.digest} ({r.bytes_uploaded} bytes uploaded)",
    )


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
    network: Optional[str] = typer.Option(None, "--network", help="build network mode, e.g. none for a bridgeless daemon"),
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
