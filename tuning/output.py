"""The job's output: adapter files, the completion sentinel, and the adapter image push.

Called by `kaito.tuning.trainer` at the end of a run (and on a rerun that
finds training already complete). The adapter lands as
`adapter_config.json` + `adapter_model.safetensors` in the output dir, each
renamed into place after it is fully written; `fine_tuning_completed.txt`
follows only then. The push packages exactly those two files with
`kaito.image_builder.build_adapter` (Kaito's layout: both under /data,
annotation sh.kaito.model.name) using the mounted dockerconfigjson, and the
digest is logged and written to `adapter_image_digest.txt` beside them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from kaito.presets.contract import ADAPTER_FILES
from kaito.presets.errors import InvalidInput, KaitoError
from kaito.presets.fsio import atomic_write_text
from kaito.tuning import DIGEST_FILE, SENTINEL

log = logging.getLogger("kaito.tuning")


def adapter_complete(d: Path) -> bool:
    """Both files present and readable: config parses, safetensors header parses."""
    cfg, weights = Path(d) / ADAPTER_FILES[0], Path(d) / ADAPTER_FILES[1]
    if not (cfg.is_file() and weights.is_file()):
        return False
    try:
        json.loads(cfg.read_text())
        from safetensors import safe_open

        with safe_open(str(weights), "np") as f:
            return len(list(f.keys())) > 0
    except Exception:  # any parse failure means an incomplete or foreign file
        return False


def write_adapter(model, out_dir: Path) -> None:
    """Save the LoRA adapter (safetensors) into out_dir, then the sentinel."""
    out_dir = Path(out_dir)
    (out_dir / SENTINEL).unlink(missing_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    try:
        model.save_pretrained(str(stage), safe_serialization=True)
        for name in ADAPTER_FILES:
            src = stage / name
            if not src.is_file():
                raise KaitoError(f"saving the adapter: {name} was not written")
            os.chmod(src, 0o644)  # safetensors writes 0600; the image must be readable by any uid
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not adapter_complete(out_dir):
        raise KaitoError(f"saving the adapter into {out_dir}: files are incomplete")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(out_dir / SENTINEL, f"Fine-tuning completed at {stamp}\n")
    log.info("adapter written to %s", out_dir)


def push_adapter(
    out_dir: Path, ref: str, *, preset_name: Optional[str] = None, auth_file: Union[str, Path, None] = None
) -> str:
    """Push the complete adapter as an image; returns (and records) the manifest digest."""
    out_dir = Path(out_dir)
    if not ((out_dir / SENTINEL).is_file() and adapter_complete(out_dir)):
        raise KaitoError(f"pushing {ref}: the adapter in {out_dir} is not complete; not pushing it")
    try:
        from kaito.image_builder import build_adapter
    except ImportError as e:
        raise KaitoError(f"pushing {ref}: the image builder is not available ({e})") from None
    stage = Path(tempfile.mkdtemp(prefix=".push-", dir=out_dir))
    try:
        # Only the two adapter files go into the image: never checkpoints,
        # data or the sentinel.
        for name in ADAPTER_FILES:
            shutil.copy2(out_dir / name, stage / name)
        result = build_adapter(stage, ref, preset_name=preset_name, auth_file=str(auth_file) if auth_file else None)
    except KaitoError as e:
        # Same class (bad input vs failure), with what was being done in front.
        cls = InvalidInput if isinstance(e, InvalidInput) else KaitoError
        raise cls(f"pushing the adapter image {ref}: {e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    digest = result.digest
    repo = ref.split("@")[0]
    if ":" in repo.rsplit("/", 1)[-1]:  # drop the tag: the digest names the image exactly
        repo = repo.rsplit(":", 1)[0]
    atomic_write_text(out_dir / DIGEST_FILE, f"{repo}@{digest}\n")
    log.info("pushed %s digest %s", ref, digest)
    return digest
