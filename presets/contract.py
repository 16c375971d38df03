"""What the pods agree on: paths, ports and environment names shared across packages.

The operator renders pods whose containers run the runtime (`kaito.runtime`),
the tuning job (`kaito.tuning`) and the `kaito` CLI of the base image
(`kaito presets weights`, `kaito image pull`); the image builder puts weights
where the runtime reads them. Each of those strings is written once, here
(Kaito's own paths, so its users' configs and volume mounts keep working).
Called by kaito.operator's renderers and admission, kaito.presets.hub (the
cache variable), kaito.image_builder.build and kaito.tuning (adapter file
names, weights and results paths, the training config key), the runtime's
adapter loading (`kaito.runtime.lora`, `serving`) and tests that cross each
seam; the defaults the runtime keeps in its own settings must equal these
(tests/operator/test_seams.py checks they do).
"""

from __future__ import annotations

WEIGHTS_DIR = "/workspace/weights"
"""Model directory in the runtime image: config.json, tokenizer, safetensors."""

DOWNLOADED_WEIGHTS_DIR = f"{WEIGHTS_DIR}/model"
"""Model directory of presets that download at start: a sub-directory, because the
download stages beside its destination and the volume's root is a mount point."""

HUB_CACHE_DIR = f"{WEIGHTS_DIR}/.hub-cache"
"""Download cache on the same volume: partial files survive a killed init container."""

ADAPTERS_DIR = "/mnt/adapter"
"""One sub-directory per LoRA adapter, named like the adapter."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
"""A PEFT adapter directory: what tuning writes, an adapter image carries and the runtime loads."""

CONFIG_DIR = "/mnt/config"
"""Where the workspace's ConfigMap is mounted."""

INFERENCE_CONFIG_FILE = "inference_config.yaml"
TRAINING_CONFIG_FILE = "training_config.yaml"

DATA_DIR = "/mnt/data"
"""Training data, filled by the data init container or a volume."""

RESULTS_DIR = "/mnt/results"
"""Where the trainer writes the adapter (Kaito's output_dir)."""

DOCKER_CONFIG_DIR = "/var/run/secrets/kaito/docker"
"""Registry credentials (a dockerconfigjson Secret mounted as config.json; DOCKER_CONFIG points here).

Not /root/.docker: the images run as uid 1000, which cannot enter /root."""

RUNTIME_PORT = 5000
"""HTTP port of the runtime: /chat, /v1/*, /health, /metrics."""

TORCHRUN_PORT = 29500
"""torchrun rendezvous port of multi-node inference."""

ENV_HF_TOKEN = "HF_TOKEN"
"""Hugging Face token, read by kaito.presets.hub (and the key in the user's Secret)."""

ENV_HF_ENDPOINT = "HF_ENDPOINT"
"""Hub endpoint huggingface_hub reads (a mirror, or a loopback server in tests)."""

ENV_HUB_CACHE = "KAITO_HUB_CACHE"
"""Download cache directory of kaito.presets.hub."""

ENV_DOCKER_CONFIG = "DOCKER_CONFIG"
"""Directory holding config.json with registry credentials (docker's own variable)."""


def config_path(file_name: str) -> str:
    """Path of a config file from the mounted ConfigMap, e.g. /mnt/config/inference_config.yaml."""
    return f"{CONFIG_DIR}/{file_name}"
