"""The Workspace resource (kaito.sh) as pydantic models, both served versions.

The one schema module: `kaito.operator.crd` generates the CRD's OpenAPI
schema from these models, `kaito.operator.admission` parses incoming objects
with them, and the renderers read the parsed `Workspace`. Field names are
Kaito's camelCase wire names (aliases); `resource`, `inference`, `tuning` and
`status` sit at the top level, there is no `spec`.

v1alpha1 and v1beta1 share one schema (Kaito's classic fields); v1beta1 is the
stored version and the CRD converts with strategy None, so the API server
serves any object at either version.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kaito.sh"
KIND = "Workspace"
PLURAL = "workspaces"
VERSIONS = ("v1alpha1", "v1beta1")
STORAGE_VERSION = "v1beta1"

# Annotations and labels users and children carry (Kaito's names).
ANN_BYPASS = "kaito.sh/bypass-resource-checks"
ANN_ENABLE_LB = "kaito.sh/enablelb"
LABEL_WORKSPACE = "kaito.sh/workspace"
LABEL_WORKSPACE_NS = "kaito.sh/workspacenamespace"

# The CRD's hard cap on resource.count, so the API server refuses a typo (count: 1000000)
# before any admission or rendering. It is deliberately generous: admission applies the
# precise bound of each preset on each SKU (`kaito.presets.skus.count_range`: the nodes a
# distributed preset needs, or 1 to KAITO_MAX_REPLICAS replicas) with its own message.
MAX_NODES = 1000


class _Model(BaseModel):
    # populate_by_name lets tests and renderers build models in Python names;
    # extra="ignore" mirrors the API server, which prunes unknown fields.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class LabelSelectorRequirement(_Model):
    key: str = Field(..., description="Label key the requirement applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        ..., description="How the key relates to the values."
    )
    values: list[str] | None = Field(None, description="Values for In/NotIn.")


class LabelSelector(_Model):
    match_labels: dict[str, str] | None = Field(None, description="Labels every node must carry.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, description="Label requirements every node must meet."
    )


class ResourceSpec(_Model):
    count: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description=(
            f"Number of GPU nodes (default 1, hard cap {MAX_NODES}): the nodes a distributed preset needs on "
            "the instance type, else the replica count (at most the operator's KAITO_MAX_REPLICAS)."
        ),
    )
    instance_type: str = Field(
        "Standard_NC24ads_A100_v4", description="Cloud GPU SKU of the nodes, e.g. Standard_NC6s_v3."
    )
    label_selector: LabelSelector = Field(..., description="Selects the nodes the workload runs on.")
    preferred_nodes: list[str] | None = Field(
        None, description="Existing node names to use before provisioning new ones."
    )


class PresetOptions(_Model):
    image: str | None = Field(None, description="Image of a private preset (required for accessMode private).")
    image_pull_secrets: list[str] | None = Field(None, description="Secrets for pulling the private image.")
    model_access_secret: str | None = Field(
        None,
        description="Secret with the Hugging Face token under key HF_TOKEN, for presets that download "
        "their weights at start (gated models such as llama-3.1-8b-instruct).",
    )


class PresetSpec(_Model):
    name: str = Field(
        ...,
        description="Preset name from the catalog (`kaito presets list`) or its Hugging Face repo "
        "(e.g. microsoft/Phi-3-mini-4k-instruct).",
    )
    access_mode: Literal["public", "private"] = Field(
        "public", description="public: the project's image; private: bring your own image in presetOptions."
    )
    preset_options: PresetOptions | None = Field(
        None, description="Private image and pull secrets, or the token Secret of a gated preset."
    )


class DataSource(_Model):
    name: str | None = Field(None, description="Name of the adapter (DNS-1123 label).")
    urls: list[str] | None = Field(None, description="URLs of data files downloaded into /mnt/data.")
    volume_source: dict[str, Any] | None = Field(
        None, description="A Kubernetes volume source mounted as the data (e.g. persistentVolumeClaim)."
    )
    image: str | None = Field(None, description="OCI image holding the data or adapter.")
    image_pull_secrets: list[str] | None = Field(None, description="Secrets for pulling the image.")


class DataDestination(_Model):
    volume_source: dict[str, Any] | None = Field(None, description="Volume the results are written to.")
    image: str | None = Field(None, description="Image reference the tuned adapter is pushed to.")
    image_push_secret: str | None = Field(
        None, description="kubernetes.io/dockerconfigjson Secret used to push the adapter image."
    )


class AdapterSpec(_Model):
    source: DataSource = Field(..., description="Where the adapter comes from (name and image).")
    strength: str | None = Field(None, description="Adapter weight, a float in [0,1] written as a string.")


class InferenceSpec(_Model):
    preset: PresetSpec | None = Field(None, description="Model preset to serve (or give a template).")
    template: dict[str, Any] | None = Field(
        None, description="A raw pod template to run instead of a preset."
    )
    config: str | None = Field(
        None, description="Name of a ConfigMap holding inference_config.yaml (defaults when absent)."
    )
    adapters: list[AdapterSpec] | None = Field(None, description="LoRA adapters applied to the preset model.")


class TuningSpec(_Model):
    preset: PresetSpec = Field(..., description="Model preset to tune.")
    method: Literal["lora", "qlora"] = Field(..., description="Tuning method.")
    config: str | None = Field(
        None, description="Name of a ConfigMap holding training_config.yaml (Kaito's default when absent)."
    )
    input: DataSource = Field(..., description="Training data: exactly one of urls, image, volumeSource.")
    output: DataDestination = Field(..., description="Where the adapter goes: image + imagePushSecret, or volumeSource.")


class Condition(_Model):
    type: str = Field(..., description="Condition type, e.g. ResourceReady.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str | None = Field(None, description="CamelCase reason.")
    message: str | None = Field(None, description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was set for.")


class WorkspaceStatus(_Model):
    worker_nodes: list[str] | None = Field(None, description="Nodes the workload runs on.")
    conditions: list[Condition] | None = Field(None, description="Progress of the workspace.")


class Workspace(_Model):
    """A Kaito Workspace: GPU nodes plus an inference service or a tuning job."""

    api_version: str | None = Field(None, description="kaito.sh/v1alpha1 or kaito.sh/v1beta1.")
    kind: str | None = Field(None, description="Workspace.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    resource: ResourceSpec = Field(..., description="GPU nodes the workspace needs.")
    inference: InferenceSpec | None = Field(None, description="Serve a model (exclusive with tuning).")
    tuning: TuningSpec | None = Field(None, description="Tune a model (exclusive with inference).")
    status: WorkspaceStatus | None = Field(None, description="Written by the operator.")

    @property
    def name(self) -> str:
        return self.metadata.get("name", "")

    @property
    def namespace(self) -> str:
        return self.metadata.get("namespace") or "default"

    @property
    def annotations(self) -> dict[str, str]:
        found = self.metadata.get("annotations")
        return found if isinstance(found, dict) else {}  # admission reports a malformed one


# One model per served version; both are the classic schema (see module docstring).
MODELS: dict[str, type[Workspace]] = {v: Workspace for v in VERSIONS}
