"""Kaito's default training configs (`training_config.yaml` for lora and qlora): the one home.

Called by the operator (`kaito.operator.render_tuning` writes the text into
the tuning ConfigMap when a Workspace names no `tuning.config`) and by the
tuning job (`kaito.tuning.trainer` parses it when `--config` is not given).
The files live beside this module in `training_configs/`, so neither package
reads the other's files; plain text, no torch.

    from kaito.presets.training_configs import default_training_config
    default_training_config("qlora")   # the ConfigMap value, Kaito's format
"""

from __future__ import annotations

from pathlib import Path

from kaito.presets.errors import InvalidInput
from kaito.presets.spec import TuningMethod

CONFIG_DIR = Path(__file__).parent / "training_configs"
METHODS = tuple(m.value for m in TuningMethod)


def default_training_config_path(method: str) -> Path:
    """Path of the default training_config.yaml for `method` (lora or qlora)."""
    if method not in METHODS:
        raise InvalidInput(f"--method {method!r} is not one of {', '.join(METHODS)}")
    return CONFIG_DIR / f"{method}.yaml"


def default_training_config(method: str) -> str:
    """Text of the default config for `method`: the value of the ConfigMap key training_config.yaml."""
    return default_training_config_path(method).read_text()


__all__ = ["CONFIG_DIR", "METHODS", "default_training_config", "default_training_config_path"]
