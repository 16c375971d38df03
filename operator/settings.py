"""Operator settings: a plain dataclass, read from KAITO_* environment variables.

Built by `kaito operator run` (from the environment the Deployment sets) and
by tests and the benchmark directly; passed to the renderers and handlers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from kaito.presets.version import KAITO_VERSION
from kaito.presets.images import base_image

DEFAULT_REGISTRY = "mcr.microsoft.com/aks/kaito"


@dataclass(frozen=True)
class OperatorSettings:
    """Everything that varies between clusters; defaults match Kaito on AKS."""

    registry: str = DEFAULT_REGISTRY
    """Registry of the preset images: `<registry>/kaito-<preset>:<tag>`."""

    version: str = KAITO_VERSION
    """Project version; tags the base (puller/runtime-without-weights) image."""

    puller_image: str | None = None
    """Image whose `kaito` CLI pulls adapters, data and weights in init containers;
    `<registry>/kaito-base:<version>` when unset."""

    bring_your_own_nodes: bool = False
    """Never create NodeClaims: wait for enough Ready nodes matching the selector."""

    weights_from_modelpack: bool = False
    """Run the base image and pull the weights (ModelPack artifact
    `<registry>/kaito-<preset>-weights:<tag>`) into /workspace/weights in an init container."""

    hub_endpoint: str | None = None
    """Hugging Face endpoint (HF_ENDPOINT) of the init containers that download gated presets
    at start; None: huggingface.co. A mirror, or a loopback hub in tests."""

    node_class_group: str = "karpenter.azure.com"
    """Group of the Karpenter node class NodeClaims reference (karpenter.k8s.aws on AWS)."""

    node_class_kind: str = "AKSNodeClass"
    """Kind of the node class (EC2NodeClass on AWS)."""

    node_class_name: str = "image-family-ubuntu"
    """Name of the node class object."""

    node_pool: str = "kaito"
    """Value of the karpenter.sh/nodepool label and requirement on NodeClaims."""

    resync_seconds: float = 30.0
    """Period of the status re-check timer on every Workspace."""

    retry_seconds: float = 10.0
    """Delay before a handler that waits (nodes, pods, job) runs again."""

    readiness_timeout_override_seconds: float | None = None
    """Seconds to wait for pods and NodeClaims to be ready, instead of each preset's
    readiness timeout (30 min by default); for tests and drills only, None in production."""

    webhook_port: int = 8443
    """Port of the validating webhook server (0: no webhook)."""

    webhook_cert_dir: str | None = "/certs"
    """Directory with tls.crt/tls.key for the webhook (cert-manager Secret); None: plain HTTP (tests)."""

    webhook_host: str | None = None
    """Host name the webhook listens for; None: all addresses."""

    @property
    def puller(self) -> str:
        return self.puller_image or self.base_image

    @property
    def base_image(self) -> str:
        return base_image(self.registry, self.version)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        """Read KAITO_<FIELD> variables (e.g. KAITO_REGISTRY, KAITO_BRING_YOUR_OWN_NODES=true)."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"KAITO_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default
            if f.name == "readiness_timeout_override_seconds":
                kwargs[f.name] = float(raw) if raw.strip() else None
            elif isinstance(default, bool):
                kwargs[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                kwargs[f.name] = int(raw)
            elif isinstance(default, float):
                kwargs[f.name] = float(raw)
            else:
                kwargs[f.name] = raw or None
        return cls(**kwargs)

