"""Building Kaito images: preset images (+ their ModelPack artifact) and adapter images.

A preset image is a base runtime image (reused by digest, never rebuilt)
plus one uncompressed layer per weight file under /workspace/weights and one
small layer for config and tokenizer files. The same layer blobs also form a
weights-only CNCF ModelPack artifact tagged `<tag>-modelpack` beside the
image, so no blob is stored twice. Same inputs, same digests; a rebuild with
unchanged weights hashes nothing (digest cache) and uploads nothing.
Called by the CLI (`kaito image build-preset|build-adapter`), tuning (adapters)
and `make build-preset`.
"""

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
from kaito.presets.errors import InvalidInput, KaitoError

DEFAULT_REGISTRY = os.environ.get("KAITO_REGISTRY", "./out/registry")
WEIGHTS_ROOT = "workspace/weights"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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
    try:
        from kaito.presets.weights import materialize_weights
    except ImportError:
        materialize_weights = None
    if materialize_weights is not None:
        return Path(materialize_weights(spec, dest, overwrite=True))
    if spec.embedded:
        from kaito.presets import make_tiny

        return make_tiny(dest, size=spec.embedded, overwrite=True)
    raise KaitoError(f"building {spec.name}: no weight source available here; pass --weights DIR")


def _split_files(d: Path) -> tuple[list[str], list[str]]:
    weights, other = [], []
    for p in sorted(d.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = str(p.relative_to(d))
        if p.suffix in PICKLE_SUFFIXES:
            raise InvalidInput(f"weights dir {d}: {rel} is a pickle checkpoint; only safetensors weights are packaged")
        (weights if p.suffix == ".safetensors" else other).append(rel)
    if not weights:
        raise InvalidInput(f"weights dir {d}: no *.safetensors files; convert the checkpoint to safetensors first")
    if "config.json" not in other:
        raise InvalidInput(f"weights dir {d}: config.json is missing; a model directory needs it")
    return weights, other


def _modelpack(spec, tag: str, weight_layers: list[Layer], config_layer: Layer, annotations: dict) -> Image:
    cfg = {
        "descriptor": {
            "name": spec.name,
            "version": tag,
            "family": spec.family,
            "revision": spec.hf_revision or "",
            **({"sourceURL": f"https://huggingface.co/{spec.hf_repo}"} if spec.hf_repo else {}),
        },
        "config": {"format": "safetensors", "precision": spec.dtype},
        "modelfs": {"type": "layers", "diffIds": [x.diff_id for x in (*weight_layers, config_layer)]},
    }
    layers = tuple(x.with_media_type(V.MODEL_WEIGHT_TAR) for x in weight_layers) + (
        config_layer.with_media_type(V.MODEL_WEIGHT_CONFIG_TAR),
    )
    return Image(V.canonical_json(cfg), layers, annotations, V.MODEL_CONFIG, V.MODEL_ARTIFACT)


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
    """Build `<registry>/kaito-<preset>:<tag>` (and `...:<tag>-modelpack`) and write both."""
    spec = get_preset(preset_name)
    tag = tag or spec.image_tag
    registry = registry or DEFAULT_REGISTRY
    ref = image_ref_for(registry, f"kaito-{spec.name}", tag)
    wdir = preset_weights(spec.name, weights_dir)
    weights, other = _split_files(wdir)
    sink = Layout(ref.path) if ref.is_layout else None
    # Building into a layout writes each blob in the same pass that hashes it.
    written = [0]

    def digester(segments, prog):
        written[0] += sum(len(x) if isinstance(x, bytes) else x.length for x in segments)
        return sink.digester(segments, prog)

    hook = {"digester": digester, "have": sink.has_blob} if sink else {}

    def ann(rel: str) -> dict:
        return {V.MODEL_FILEPATH: rel, V.ANN_TITLE: f"{rel}.tar"}

    wl = [
        Layer.from_file(
            wdir / f,
            f"{WEIGHTS_ROOT}/{f}",
            annotations=ann(f),
            progress=progress.task(f"hash:{f}", f"hash {f}", (wdir / f).stat().st_size),
            **hook,
        )
        for f in weights
    ]
    cl = Layer.from_dir(wdir, WEIGHTS_ROOT, files=other, annotations=ann("config"), **hook)
    with Connection(auth_file, insecure) as conn:
        base_img = read_image(as_ref(base, "base"), conn) if base else empty_image()
        labels = {
            "org.opencontainers.image.title": f"kaito-{spec.name}",
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
        annotations = {**labels, V.ANN_MODEL_NAME: spec.name, V.ANN_CONTENT_ROOT: WEIGHTS_ROOT}
        if base:
            annotations["org.opencontainers.image.base.name"] = str(as_ref(base, "base"))
            annotations["org.opencontainers.image.base.digest"] = base_img.digest
        img = append(
            base_img,
            [*wl, cl],
            env={"KAITO_MODEL_DIR": "/workspace/weights", "KAITO_PRESET": spec.name},
            labels=labels,
            annotations=annotations,
            workdir="/workspace",
            # A preset image serves by default (KAITO_PRESET/KAITO_MODEL_DIR above
            # configure it); Kaito's pods still pass the command explicitly.
            entrypoint=["python", "-m", "kaito.runtime"] if base else None,
            cmd=[] if base else None,
            created_by="kaito image build-preset",
        )
        res = write_image(img, ref, conn, jobs=jobs, progress=progress, **push_kw)
        mp_ref = mp_digest = None
        uploaded = res.bytes_uploaded
        if modelpack:
            mp = _modelpack(
                spec,
                tag,
                wl,
                cl,
                {k: v for k, v in annotations.items() if not k.startswith("org.opencontainers.image.base")},
            )
            mres = write_image(mp, ref.with_tag(f"{tag}-modelpack"), conn, jobs=jobs, progress=progress, **push_kw)
            mp_ref, mp_digest, uploaded = mres.ref, mres.digest, uploaded + mres.bytes_uploaded
    layers = tuple({"file": x.annotations[V.MODEL_FILEPATH], "digest": x.digest, "size": x.size} for x in (*wl, cl))
    # for a layout, the weight blobs were written while hashing: count them as sent too
    return BuildResult(res.ref, res.digest, mp_ref, mp_digest, img.size, layers, uploaded + written[0], base)


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
    missing = [f for f in ADAPTER_FILES if not (d / f).is_file()]
    if missing:
        raise InvalidInput(
            f"adapter dir {d}: missing {', '.join(missing)}; an adapter image needs {' and '.join(ADAPTER_FILES)} "
            "(save it with PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except ValueError as e:
        raise InvalidInput(f"adapter dir {d}: adapter_config.json is not JSON ({e})") from None
    if preset_name:
        preset_name = get_preset(preset_name).name
    model = preset_name or str(cfg.get("base_model_name_or_path") or "")
    layers = [
        Layer.from_file(
            d / f,
            f"data/{f}",
            annotations={V.MODEL_FILEPATH: f, V.ANN_TITLE: f"{f}.tar"},
            progress=progress.task(f"hash:{f}", f"hash {f}", (d / f).stat().st_size),
        )
        for f in ADAPTER_FILES
    ]
    annotations = {V.ANN_CONTENT_ROOT: "data", "org.opencontainers.image.title": f"{d.name} adapter"}
    if model:
        annotations[V.ANN_MODEL_NAME] = model
    img = append(
        empty_image(),
        layers,
        annotations=annotations,
        labels={V.ANN_MODEL_NAME: model} if model else None,
        created_by="kaito image build-adapter",
    )
    with Connection(auth_file, insecure) as conn:
        return write_image(img, as_ref(ref, "adapter image reference"), conn, progress=progress, **push_kw)
