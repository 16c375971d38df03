"""Building Kaito images: preset images (+ their ModelPack artifact) and adapter images.

A preset image is a base runtime image (reused by digest, never rebuilt)
plus one uncompressed layer per file of the weights directory under
/workspace/weights. The same files also form a weights-only CNCF ModelPack
artifact, `<registry>/kaito-<preset>-weights:<tag>` (names from
kaito.presets.images), one layer per file at its model-relative path, as the
ModelPack spec reads. Same inputs, same digests; a rebuild with unchanged
weights hashes nothing (digest cache) and uploads nothing.
Called by the CLI (`kaito image build-preset|build-adapter`), tuning (adapters)
and `make build-preset`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from kaito.image_builder.oci import values as V
from kaito.image_builder.oci.image import Image, append, empty_image
from kaito.image_builder.oci.layer import Layer, _cache_dir
from kaito.image_builder.oci.layout import Layout
from kaito.image_builder.oci.progress import NULL, Progress
from kaito.image_builder.oci.reference import Reference, image_ref_for
from kaito.image_builder.transfer import Connection, PushResult, as_ref, read_image, write_image
from kaito.presets import __version__ as KAITO_VERSION
from kaito.presets import get_preset
from kaito.presets.contract import ADAPTER_CONFIG_FILE, ADAPTER_FILES
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.images import BASE_REPOSITORY, image_repository, modelpack_repository
from kaito.presets.weights import PICKLE_SUFFIXES

DEFAULT_REGISTRY = os.environ.get("KAITO_REGISTRY", "./out/registry")
WEIGHTS_ROOT = "workspace/weights"


@dataclass(frozen=True)
class BuildResult:
    """A built preset image and its ModelPack artifact."""

    ref: str
    digest: str
    modelpack_ref: Optional[str]
    modelpack_digest: Optional[str]
    size: int
    layers: tuple[dict, ...]
    bytes_uploaded: int  # bytes sent to the registry (or written into the layout)
    base: Optional[str] = None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


LOCAL_LAYOUT = "out/registry"  # where `make build-base` stores the base (an OCI layout)


def default_base_refs(registry: str) -> list[str]:
    """Where a preset build looks for the runtime base when none is named, in order.

    `<registry>/kaito-base:<version>` (the same name the operator runs init containers
    from), then the layout `make build-base` writes (out/registry/kaito-base:<version>).
    """
    refs = [str(image_ref_for(registry, BASE_REPOSITORY, KAITO_VERSION))]
    local = str(image_ref_for(LOCAL_LAYOUT, BASE_REPOSITORY, KAITO_VERSION))
    return refs if local in refs else [*refs, local]


def resolve_base(base: Optional[str], registry: Optional[str], conn: Connection) -> str:
    """The base image for a preset build: `base` as given, else the first default that exists.

    A preset image without the runtime cannot serve, so a missing base is an error
    that says how to build or name one, never a silent weights-only image.
    """
    if base:
        return base
    tried = default_base_refs(registry or DEFAULT_REGISTRY)
    for ref in tried:
        try:
            read_image(as_ref(ref, "base"), conn)
        except (KaitoError, OSError):  # not there (or unreachable): try the next place
            continue
        return ref
    raise InvalidInput(
        f"--base: no runtime base image at {' or '.join(tried)}; build it once with "
        "`make build-base` (stores it in out/registry), or name one with --base / KAITO_BASE_IMAGE "
        "(a registry reference, oci:DIR:TAG, or docker-daemon:NAME:TAG); --weights-only builds an image "
        "that holds only the weights and cannot serve"
    )


def preset_weights(preset_name: str, weights_dir: Optional[Union[str, Path]] = None) -> Path:
    """The weights directory for a preset: the given one, else produced by the foundation's weight sources."""
    spec = get_preset(preset_name)
    if weights_dir is not None:
        d = Path(weights_dir)
        if not d.is_dir():
            raise InvalidInput(
                f"--weights {d}: not a directory; pass a directory holding config.json and *.safetensors"
            )
        return d
    dest = _cache_dir() / "weights" / f"{spec.name}-{spec.hf_revision or spec.embedded}"
    if dest.is_dir() and any(dest.glob("*.safetensors")):
        return dest
    # Imported here: the hub and tiny-factory code is only needed when no weights are cached yet.
    from kaito.presets.weights import materialize_weights

    return materialize_weights(spec, dest, overwrite=True)


def _split_files(d: Path) -> tuple[list[str], list[str]]:
    weights: list[str] = []
    other: list[str] = []
    for p in sorted(d.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = str(p.relative_to(d))
        if p.name.endswith(PICKLE_SUFFIXES):
            raise InvalidInput(f"weights dir {d}: {rel} is a pickle checkpoint; only safetensors weights are packaged")
        (weights if p.suffix == ".safetensors" else other).append(rel)
    if not weights:
        raise InvalidInput(f"weights dir {d}: no *.safetensors files; convert the checkpoint to safetensors first")
    if "config.json" not in other:
        raise InvalidInput(f"weights dir {d}: config.json is missing; a model directory needs it")
    return weights, other


def _modelpack_media_type(rel: str) -> str:
    """ModelPack's layer kinds: weights, their config (config.json, tokenizer files), docs, code."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".safetensors"):
        return V.MODEL_WEIGHT_TAR
    if name.endswith(".md") or name.upper().startswith(("LICENSE", "README", "NOTICE")):
        return V.MODEL_DOC_TAR
    if name.endswith(".py"):
        return V.MODEL_CODE_TAR
    return V.MODEL_WEIGHT_CONFIG_TAR


def _arcname(prefix: str, f: str) -> str:
    return f"{prefix}/{f}" if prefix else f


def _file_annotations(arc: str) -> dict[str, str]:
    """A file layer's annotations: its `org.cncf.model.filepath` is its path in the tar."""
    return {V.MODEL_FILEPATH: arc, V.ANN_TITLE: f"{arc}.tar"}


def _file_layers(wdir: Path, files: list[str], prefix: str, hook: dict, progress: Progress) -> list[Layer]:
    """One uncompressed tar layer per file at `<prefix>/<file>`."""
    out = []
    for f in files:
        arc = _arcname(prefix, f)
        out.append(
            Layer.from_file(
                wdir / f,
                arc,
                annotations=_file_annotations(arc),
                progress=progress.task(f"hash:{arc}", f"hash {arc}", (wdir / f).stat().st_size),
                **hook,
            )
        )
    return out


def _shared_file_layers(wdir: Path, files: list[str], prefixes: list[str], progress: Progress) -> list[list[Layer]]:
    """Each file as one tar layer per prefix, the file read once for all of them; one list per prefix.

    The same layers `_file_layers` gives for each prefix alone (same digests, same cache entries).
    """
    per_file = [
        Layer.from_file_variants(
            wdir / f,
            [(_arcname(p, f), _file_annotations(_arcname(p, f))) for p in prefixes],
            progress=progress.task(f"hash:{f}", f"hash {f}", (wdir / f).stat().st_size),
        )
        for f in files
    ]
    return [list(column) for column in zip(*per_file, strict=True)] if per_file else [[] for _ in prefixes]


def _modelpack(spec, tag: str, layers: list[Layer], annotations: dict) -> Image:
    """The weights as a CNCF ModelPack artifact (github.com/modelpack/model-spec, docs/spec.md and config.md).

    One tar layer per file, its path in the tar relative to the model directory and equal to its
    `org.cncf.model.filepath`, so any ModelPack extractor rebuilds the weights directory as it was.
    """
    config = {"format": "safetensors"}
    if spec.dtype and spec.dtype != "auto":  # the spec's precision names match torch's dtype names
        config["precision"] = spec.dtype
    descriptor = {
        "name": spec.name,
        "version": tag,
        "family": spec.family,
        "revision": spec.hf_revision or f"embedded-{spec.embedded}",
        "sourceURL": f"https://huggingface.co/{spec.hf_repo}" if spec.hf_repo else None,
    }
    cfg = {
        "descriptor": {k: v for k, v in descriptor.items() if v},  # the schema has no nulls: absent, not null
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [x.diff_id for x in layers]},
    }
    typed = tuple(x.with_media_type(_modelpack_media_type(x.annotations[V.MODEL_FILEPATH])) for x in layers)
    return Image(V.canonical_json(cfg), typed, annotations, V.MODEL_CONFIG, V.MODEL_ARTIFACT)


def _sink_hook(ref: Reference) -> tuple[dict, list]:
    """Building into a layout writes each blob in the same pass that hashes it; returns (hook, bytes written)."""
    if ref.path is None:  # not a layout
        return {}, [0]
    sink, written = Layout(ref.path), [0]

    def digester(segments, prog):
        written[0] += sum(len(x) if isinstance(x, bytes) else x.length for x in segments)
        return sink.digester(segments, prog)

    return {"digester": digester, "have": sink.has_blob}, written


@dataclass
class _Output:
    """Where one build's images go and how: hashing into their sink, then writing each image."""

    conn: Connection
    jobs: int
    progress: Progress
    push_kw: dict
    written: int = 0  # bytes a layout sink took while hashing: they count as sent

    def file_layers(self, ref: Reference, wdir: Path, files: list[str], prefix: str) -> list[Layer]:
        """The file layers for an image bound for `ref` (into a layout, written as they hash)."""
        hook, written = _sink_hook(ref)
        layers = _file_layers(wdir, files, prefix, hook, self.progress)
        self.written += written[0]
        return layers

    def file_layers_for(self, targets: list[tuple[Reference, str]], wdir: Path, files: list[str]) -> list[list[Layer]]:
        """The file layers for several images, one list per (ref, prefix) target.

        Bound for registries, each file is hashed once for every image: the
        image's tar and the ModelPack's differ only in their headers. A layout sink instead
        writes each image's blobs while hashing them, so each target keeps its own pass.
        """
        if any(ref.is_layout for ref, _ in targets):
            return [self.file_layers(ref, wdir, files, prefix) for ref, prefix in targets]
        return _shared_file_layers(wdir, files, [prefix for _, prefix in targets], self.progress)

    def write(self, img: Image, ref: Reference) -> PushResult:
        return write_image(img, ref, self.conn, jobs=self.jobs, progress=self.progress, **self.push_kw)


def _labels(spec, tag: str) -> dict:
    labels = {
        "org.opencontainers.image.title": image_repository(spec.name),
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.vendor": "kaito",
        "org.opencontainers.image.description": f"Kaito preset {spec.name} ({spec.hf_repo or 'embedded'})",
        "sh.kaito.preset": spec.name,
        "sh.kaito.preset.revision": spec.hf_revision or f"embedded-{spec.embedded}",
        "sh.kaito.version": KAITO_VERSION,
    }
    if spec.hf_repo:
        labels["org.opencontainers.image.source"] = f"https://huggingface.co/{spec.hf_repo}"
        labels["org.opencontainers.image.revision"] = spec.hf_revision
    return labels


def _preset_annotations(spec, tag: str, base: Optional[str], base_img: Image) -> dict:
    """The preset image's own manifest annotations: its labels, model name, content root and base."""
    annotations = {**_labels(spec, tag), V.ANN_MODEL_NAME: spec.name, V.ANN_CONTENT_ROOT: WEIGHTS_ROOT}
    if base:
        annotations["org.opencontainers.image.base.name"] = str(as_ref(base, "base"))
        annotations["org.opencontainers.image.base.digest"] = base_img.digest
    return annotations


def _preset_image(spec, tag: str, layers: list[Layer], base_img: Image, annotations: dict, serves: bool) -> Image:
    """The preset image: `base_img` (empty for --weights-only) plus the weight layers, labelled."""
    return append(
        base_img,
        layers,
        env={"KAITO_MODEL_DIR": "/workspace/weights", "KAITO_PRESET": spec.name},
        labels=_labels(spec, tag),
        annotations=annotations,
        workdir="/workspace",
        # A preset image serves by default (KAITO_PRESET/KAITO_MODEL_DIR above
        # configure it); Kaito's pods still pass the command explicitly.
        entrypoint=["python", "-m", "kaito.runtime"] if serves else None,
        cmd=[] if serves else None,
        created_by="kaito image build-preset",
    )


def _write_modelpack(out: _Output, spec, ref: Reference, tag: str, layers: list[Layer], annotations: dict):
    """Write the weights-only ModelPack artifact of `layers` (the files at their model-relative paths).

    It carries the preset image's annotations less those about a filesystem (content root, base).
    """
    keep = {k: v for k, v in annotations.items() if k != V.ANN_CONTENT_ROOT and ".base." not in k}
    return out.write(_modelpack(spec, tag, layers, keep), ref)


def build_preset(
    preset_name: str,
    registry: Optional[str] = None,
    *,
    tag: Optional[str] = None,
    weights_dir: Optional[Union[str, Path]] = None,
    base: Optional[str] = None,
    modelpack: bool = True,
    auth_file=None,
    insecure: Optional[bool] = None,
    jobs: int = 4,
    progress: Progress = NULL,
    **push_kw,
) -> BuildResult:
    """Build `<registry>/kaito-<preset>:<tag>` (and the ModelPack `<registry>/kaito-<preset>-weights:<tag>`)."""
    spec = get_preset(preset_name)
    tag = tag or spec.image_tag
    registry = registry or DEFAULT_REGISTRY
    ref = image_ref_for(registry, image_repository(spec.name), tag)
    wdir = preset_weights(spec.name, weights_dir)
    weights, other = _split_files(wdir)
    files = weights + other
    mp_ref = image_ref_for(registry, modelpack_repository(spec.name), tag) if modelpack else None
    targets = [(ref, WEIGHTS_ROOT)] + ([(mp_ref, "")] if mp_ref else [])
    with Connection(auth_file, insecure) as conn:
        out = _Output(conn, jobs, progress, push_kw)
        layers, *mp_layers = out.file_layers_for(targets, wdir, files)
        base_img = read_image(as_ref(base, "base"), conn) if base else empty_image()
        annotations = _preset_annotations(spec, tag, base, base_img)
        img = _preset_image(spec, tag, layers, base_img, annotations, serves=bool(base))
        res = out.write(img, ref)
        mres = _write_modelpack(out, spec, mp_ref, tag, mp_layers[0], annotations) if mp_ref else None
    summary = tuple({"file": f, "digest": x.digest, "size": x.size} for f, x in zip(files, layers, strict=True))
    uploaded = res.bytes_uploaded + (mres.bytes_uploaded if mres else 0) + out.written
    mp_ref, mp_digest = (mres.ref, mres.digest) if mres else (None, None)
    return BuildResult(res.ref, res.digest, mp_ref, mp_digest, img.size, summary, uploaded, base)


def _adapter_model(d: Path, preset_name: Optional[str]) -> str:
    """The base model an adapter directory is for (the preset, else its config's), after checking its files."""
    missing = [f for f in ADAPTER_FILES if not (d / f).is_file()]
    if missing:
        raise InvalidInput(
            f"adapter dir {d}: missing {', '.join(missing)}; an adapter image needs {' and '.join(ADAPTER_FILES)} "
            "(save it with PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    try:
        cfg = json.loads((d / ADAPTER_CONFIG_FILE).read_text())
    except ValueError as e:
        raise InvalidInput(f"adapter dir {d}: adapter_config.json is not JSON ({e})") from None
    if preset_name:
        return get_preset(preset_name).name
    return str(cfg.get("base_model_name_or_path") or "")


def _adapter_image(d: Path, model: str, progress: Progress) -> Image:
    """Kaito's adapter image: one layer per adapter file under /data, annotated with its base model."""
    layers = [
        Layer.from_file(
            d / f,
            f"data/{f}",
            annotations={V.MODEL_FILEPATH: f, V.ANN_TITLE: f"{f}.tar"},
            progress=progress.task(f"hash:{f}", f"hash {f}", (d / f).stat().st_size),
        )
        for f in ADAPTER_FILES
    ]
    # No directory names in annotations: tuning pushes from a fresh temporary directory each time,
    # and the same adapter must give the same digest.
    annotations = {V.ANN_CONTENT_ROOT: "data", "org.opencontainers.image.title": f"{model or 'kaito'} adapter"}
    if model:
        annotations[V.ANN_MODEL_NAME] = model
    return append(
        empty_image(),
        layers,
        annotations=annotations,
        labels={V.ANN_MODEL_NAME: model} if model else None,
        created_by="kaito image build-adapter",
    )


def build_adapter(
    adapter_dir: Union[str, Path],
    ref: Union[str, Reference],
    *,
    preset_name: Optional[str] = None,
    auth_file=None,
    insecure: Optional[bool] = None,
    progress: Progress = NULL,
    **push_kw,
) -> PushResult:
    """Push a PEFT adapter as Kaito's adapter image (/data/adapter_config.json, /data/adapter_model.safetensors)."""
    d = Path(adapter_dir)
    img = _adapter_image(d, _adapter_model(d, preset_name), progress)
    with Connection(auth_file, insecure) as conn:
        return write_image(img, as_ref(ref, "adapter image reference"), conn, progress=progress, **push_kw)
