"""Operator settings: a frozen dataclass, read from KAITO_* environment variables by pydantic-settings.

Built by `kaito operator run` and `kaito operator render` (from the environment
the Deployment sets, through `from_env`) and by tests and the benchmark
directly; passed to the renderers, the reconciler, the handlers and the API
client (`KubeAPI.from_connection_info`); admission gets its `max_replicas`.
Each field `x` is the variable `KAITO_X`; an invalid value is one line naming
the variable (`InvalidInput`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Annotated, Any, Mapping, get_type_hints

from pydantic import Field, ValidationError, create_model
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from kaito.presets.errors import InvalidInput
from kaito.presets.images import base_image
from kaito.presets.skus import DEFAULT_MAX_REPLICAS
from kaito.presets.version import KAITO_VERSION

ENV_PREFIX = "KAITO_"

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

    max_replicas: Annotated[int, Field(ge=1)] = DEFAULT_MAX_REPLICAS
    """Most replicas (nodes) a Workspace of a single-node preset may ask for; admission refuses more."""

    resync_seconds: Annotated[float, Field(gt=0)] = 30.0
    """Period of the status re-check timer on every Workspace."""

    retry_seconds: Annotated[float, Field(gt=0)] = 10.0
    """Delay before a handler that waits (nodes, pods, job) runs again."""

    readiness_timeout_override_seconds: float | None = None
    """Seconds to wait for pods and NodeClaims to be ready, instead of each preset's
    readiness timeout (30 min by default); for tests and drills only, None in production."""

    webhook_port: Annotated[int, Field(ge=0, le=65535)] = 8443
    """Port of the validating webhook server (0: no webhook)."""

    webhook_cert_dir: str | None = "/certs"
    """Directory with tls.crt/tls.key for the webhook (cert-manager Secret); None: plain HTTP (tests)."""

    webhook_host: str | None = None
    """Host name the webhook listens for; None: all addresses."""

    api_connect_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    """Seconds the API client waits to connect to the Kubernetes API server."""

    api_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    """Seconds one Kubernetes API request may take in all (before a retry)."""

    api_attempts: Annotated[int, Field(ge=1)] = 5
    """Tries of one API request on 429, 5xx and dropped connections (the first included)."""

    @property
    def puller(self) -> str:
        return self.puller_image or self.base_image

    @property
    def base_image(self) -> str:
        return base_image(self.registry, self.version)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read KAITO_<FIELD> variables (e.g. KAITO_REGISTRY, KAITO_BRING_YOUR_OWN_NODES=true).

        An empty value means None for the optional fields (KAITO_WEBHOOK_CERT_DIR= : plain HTTP).
        """
        env = os.environ if environ is None else environ
        model = _env_model()

        class _Read(model):  # type: ignore[misc,valid-type]
            @classmethod
            def settings_customise_sources(cls, settings_cls: Any, *_: Any, **__: Any) -> tuple[Any, ...]:
                source = EnvSettingsSource(settings_cls)
                source.env_vars = parse_env_vars(
                    env, source.case_sensitive, source.env_ignore_empty, source.env_parse_none_str
                )
                return (source,)

        try:
            read = _Read()
        except ValidationError as e:
            raise InvalidInput("; ".join(_env_problem(err) for err in e.errors())) from None
        return cls(**{name: getattr(read, name) for name in read.model_fields_set})


class _EnvBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_parse_none_str="", extra="ignore")


@functools.lru_cache(maxsize=1)
def _env_model() -> type[BaseSettings]:
    """A pydantic-settings model with the dataclass's fields, types, constraints and defaults."""
    hints = get_type_hints(OperatorSettings, include_extras=True)
    spec: dict[str, Any] = {f.name: (hints[f.name], f.default) for f in fields(OperatorSettings)}
    return create_model("OperatorEnv", __base__=_EnvBase, **spec)


def _env_problem(err: Any) -> str:
    name = ENV_PREFIX + "_".join(str(part) for part in err["loc"][:1]).upper()
    return f"{name}={err.get('input')!r}: {err['msg']}"
