"""Weight sources: turn a preset into a directory of safetensors weights.

Called by the image builder (`kaito image build-preset`), `kaito presets
weights` (which the operator's download-at-start init container runs) and
tests. Three sources:

- a local directory (a mounted volume or a previous download),
- the Hugging Face hub at the preset's pinned revision (kaito.presets.hub,
  through the project's one resumable downloader kaito.presets.download:
  Range-resumed `.part` files in a cache, sha256-checked; huggingface_hub only
  lists the repository),
- the tiny factory for embedded presets.

Only safetensors weights are accepted: pickle-based formats (`PICKLE_SUFFIXES`:
.bin, .pt, .pth, .pkl, .pickle, .ckpt) can run arbitrary code when loaded, so
they are never copied (here, nor packaged by kaito.image_builder.build) and a
source holding nothing else is refused. The destination appears only complete
(staged beside it, then renamed), so a failure leaves no partial weights dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.spec import PresetSpec

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Pickle-based checkpoint formats, refused wherever weights enter (the one list)."""
# Files a model directory needs besides weights; *.py only for trust_remote_code presets.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.txt",
    "*.tiktoken",
]


def _is_pickle_weight(name: str) -> bool:
    # training_args.bin and friends are pickles too; refuse every such file.
    return name.endswith(PICKLE_SUFFIXES)


def check_safetensors_only(directory: Path, what: str) -> list[Path]:
    """Return the safetensors files in `directory`; refuse pickle-only weights."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    st = [p for p in files if p.name.endswith(".safetensors")]
    pickles = [p for p in files if _is_pickle_weight(p.name)]
    if not st:
        if pickles:
            names = ", ".join(sorted(p.name for p in pickles)[:5])
            raise InvalidInput(
                f"{what} holds only pickle-based weights ({names}): they can execute code when loaded, so kaito "
                "accepts only safetensors; convert them (e.g. with transformers save_pretrained(safe_serialization=True))"
            )
        raise InvalidInput(f"{what} holds no .safetensors weight file")
    return st


def _stage(dest: Path, overwrite: bool) -> Path:
    occupied = dest.is_file() or (dest.is_dir() and any(dest.iterdir()))
    if occupied and not overwrite:
        raise InvalidInput(f"{dest} exists and is not empty; pass --force (overwrite=True) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))


def _commit(staging: Path, dest: Path) -> Path:
    for root, dirs, files in os.walk(staging):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(staging, 0o755)
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    os.replace(staging, dest)
    return dest


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = src.resolve()  # hub snapshots are symlinks into the blob store; link the blob itself
    try:
        os.link(src, dst)  # same filesystem: no second copy of multi-GB weights
    except OSError:
        shutil.copyfile(src, dst)


def _copy_tree(src: Path, staging: Path, allow_code: bool) -> None:
    for p in sorted(src.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(src).parts):
            continue
        if _is_pickle_weight(p.name):
            log.warning("skipping %s: pickle-based files are never loaded (safetensors only)", p.name)
            continue
        if p.suffix == ".py" and not allow_code:
            continue
        _link_or_copy(p, staging / p.relative_to(src))


def from_directory(preset: PresetSpec, src: Path, dest: Path, overwrite: bool = False) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise InvalidInput(f"weights source {src} is not a directory")
    check_safetensors_only(src, f"weights source {src}")
    staging = _stage(dest, overwrite)
    try:
        _copy_tree(src, staging, preset.trust_remote_code)
        _verify(preset, staging)
        return _commit(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def from_hub(
    preset: PresetSpec,
    dest: Path,
    overwrite: bool = False,
    token: Optional[str] = None,
    cache_dir: Optional[Path] = None,
    endpoint: Optional[str] = None,
    local_files_only: bool = False,
) -> Path:
    """Download the preset's files at its pinned revision, then link them into `dest`.

    Partial files stay in the download cache (kaito.presets.hub), so a rerun
    after a kill resumes instead of starting over.
    """
    if not preset.hf_repo or not preset.hf_revision:
        raise InvalidInput(f"preset {preset.name} has no hf_repo/hf_revision to download from")
    from kaito.presets.hub import download

    patterns = HUB_PATTERNS + (["*.py"] if preset.trust_remote_code else [])
    try:
        snapshot = download(
            preset.hf_repo,
            preset.hf_revision,
            patterns,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            local_files_only=local_files_only,
        )
    except KaitoError as e:
        raise type(e)(f"preset {preset.name}: {e}") from None
    except Exception as e:  # hub errors carry no secrets; keep their text, drop the trace
        raise KaitoError(
            f"downloading {preset.hf_repo}@{preset.hf_revision[:12]} for preset {preset.name}: {type(e).__name__}: {e}"
        ) from None
    return from_directory(preset, snapshot, dest, overwrite)


def from_tiny(preset: PresetSpec, dest: Path, overwrite: bool = False, seed: int = 0) -> Path:
    from kaito.presets.tiny import make_tiny

    if not preset.embedded:
        raise InvalidInput(f"preset {preset.name} is not embedded; its weights come from {preset.hf_repo}")
    return make_tiny(dest, size=preset.embedded, seed=seed, overwrite=overwrite)


def _verify(preset: PresetSpec, directory: Path) -> None:
    check_safetensors_only(directory, f"weights for {preset.name}")
    missing = [f for f in preset.weight_files or [] if not (directory / f).is_file()]
    if missing:
        raise KaitoError(f"weights for {preset.name} are incomplete: missing {', '.join(missing)}")
    if not (directory / "config.json").is_file():
        raise KaitoError(f"weights for {preset.name} have no config.json")


def materialize_weights(
    preset: PresetSpec,
    dest: Union[str, Path],
    source: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    **hub_kwargs,
) -> Path:
    """Produce `dest` holding the preset's weights: from `source` (a directory),
    the tiny factory (embedded presets) or the hub at the pinned revision."""
    dest = Path(dest)
    if source is not None:
        return from_directory(preset, Path(source), dest, overwrite)
    if preset.embedded:
        return from_tiny(preset, dest, overwrite)
    return from_hub(preset, dest, overwrite, **hub_kwargs)
