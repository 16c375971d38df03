"""kaito.tuning: the LoRA/QLoRA tuning job that turns a Workspace's `tuning:` into an adapter image.

Called by the tuning Job the operator renders (`python -m kaito.tuning ...` on
the preset image, `kaito tune fetch-data ...` in its init container) and by
users through `kaito tune`. This module stays free of torch. The default
training configs live in `kaito.presets.training_configs` (shared with the
operator, which writes them into the tuning ConfigMap); the two names below
are that module's functions:

    from kaito.tuning import default_config_text
    default_config_text("qlora")   # Kaito's qlora-params, `training_config:` format

Layout: `config` (Kaito's training_config.yaml onto HF classes), `compat`
(fields Kaito's parser accepts beyond the HF classes, mapped or dropped),
`fetch` (URL/image/volume inputs), `data` (formats, label masks, packing),
`trainer` (Trainer with atomic checkpoints and resume), `output` (adapter,
sentinel, push), `cli` (the commands, `kaito tune`), `__main__` (the Job's
`python -m kaito.tuning`).
"""

from __future__ import annotations

from kaito.presets.training_configs import METHODS
from kaito.presets.training_configs import default_training_config as default_config_text
from kaito.presets.training_configs import default_training_config_path as default_config_path

SENTINEL = "fine_tuning_completed.txt"
DIGEST_FILE = "adapter_image_digest.txt"

__all__ = ["DIGEST_FILE", "METHODS", "SENTINEL", "default_config_path", "default_config_text"]
