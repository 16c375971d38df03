"""kaito.tuning: the LoRA/QLoRA tuning job that turns a Workspace's `tuning:` into an adapter image.

Called by the tuning Job the operator renders (`python -m kaito.tuning ...` on
the preset image, `kaito tune fetch-data ...` in its init container) and by
users through `kaito tune`. This module stays free of torch so that the
operator can read the default configs below without the training stack:

    from kaito.tuning import default_config_text
    default_config_text("qlora")   # Kaito's qlora-params.yaml, `training_config:` format

Layout: `config` (Kaito's training_config.yaml onto HF classes), `fetch`
(URL/image/volume inputs), `data` (formats, label masks, packing), `trainer`
(Trainer with atomic checkpoints and resume), `output` (adapter, sentinel,
push), `cli` (the commands).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

METHODS = ("lora", "qlora")
SENTINEL = "fine_tuning_completed.txt"
DIGEST_FILE = "adapter_image_digest.txt"


def default_config_path(method: str) -> Path:
    """Path of Kaito's default training config for `method` (lora or qlora), shipped as package data."""
    if method not in METHODS:
        from kaito.presets.errors import InvalidInput

        raise InvalidInput(f"method {method!r} is not one of {', '.join(METHODS)}")
    return Path(str(resources.files(__name__).joinpath("configs", f"{method}-params.yaml")))


def default_config_text(method: str) -> str:
    """Text of the default config (the value of the ConfigMap key training_config.yaml)."""
    return default_config_path(method).read_text()


__all__ = ["DIGEST_FILE", "METHODS", "SENTINEL", "default_config_path", "default_config_text"]
