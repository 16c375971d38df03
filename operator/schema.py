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

from typing import Any, Literal, Optional

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
ANN_RUNTIME = "kaito.sh/runtime"
LABEL_WORKSPACE = "kaito.sh/workspace"
LABEL_WORKSPACE_NS = "kaito.sh/workspacenamespace"

CONDITION_TYPES = (
    "NodeClaimReady",
    "ResourceReady",
    "InferenceReady",
    "JobStarted",
    "WorkspaceSucceeded",
    "WorkspaceDeleting",
)


class _Model(BaseModel):
    # populate_by_name lets tests and renderers build models in Python names;
    # extra="ignore" mirrors the API server, which prunes unknown fields.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class LabelSelectorRequirement(_Model):
    key: str = Field(..., description="Label key the requirement applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        ..., description="How the key relates to the values."
    )
    values: Optional[list[str]] = Field(None, description="Values for In/NotIn.")


class LabelSelector(_Model):
    match_labels: Optional[dict[str, str]] = Field(None, description="Labels every node must carry.")
    match_expressions: Optional[list[LabelSelectorRequirement]] = Field(
        None, description="Label requirements every node must meet."
    )


class ResourceSpec(_Model):
    count: int = Field(1, ge=1, description="Number of GPU nodes (default 1).")
    instance_type: str = Field(
        "Standard_NC24ads_A100_v4", description="Cloud GPU SKU of the nodes, e.g. Standard_NC6s_v3."
    )
    label_selector: LabelSelector = Field(..., description="Selects the nodes the workload runs on.")
    preferred_nodes: Optional[list[str]] = Field(
        None, description="Existing node names to use before provisioning new ones."
    )


class PresetOptions(_Model):
    image: Optional[str] = Field(None, description="Image of a private preset (required for accessMode private).")
    image_pull_secrets: Optional[list[str]] = Field(None, description="Secrets for pulling the private image.")


class PresetSpec(_Model):
    name: str = Field(..., description="Preset name from the catalog (`kaito presets list`).")
    access_mode: Literal["public", "private"] = Field(
        "public", description="public: the project's image; private: bring your own image in presetOptions."
    )
    preset_options: Optional[PresetOptions] = Field(None, description="Image options of private presets.")


class DataSource(_Model):
    name: Optional[str] = Field(None, description="Name of the adapter (DNS-1123 label).")
    urls: Optional[list[str]] = Field(None, description="URLs of data files downloaded into /mnt/data.")
    volume_source: Optional[dict[str, Any]] = Field(
        None, description="A Kubernetes volume source mounted as the data (e.g. persistentVolumeClaim)."
    )
    image: Optional[str] = Field(None, description="OCI image holding the data or adapter.")
    image_pull_secrets: Optional[list[str]] = Field(None, description="Secrets for pulling the image.")


class DataDestination(_Model):
    volume_source: Optional[dict[str, Any]] = Field(None, description="Volume the results are written to.")
    image: Optional[str] = Field(None, description="Image reference the tuned adapter is pushed to.")
    image_push_secret: Optional[str] = Field(
        None, description="kubernetes.io/dockerconfigjson Secret used to push the adapter image."
    )


class AdapterSpec(_Model):
    source: DataSource = Field(..., description="Where the adapter comes from (name and image).")
    strength: Optional[str] = Field(None, description="Adapter weight, a float in [0,1] written as a string.")


class InferenceSpec(_Model):
    preset: Optional[PresetSpec] = Field(None, description="Model preset to serve (or give a template).")
    template: Optional[dict[str, Any]] = Field(
        None, description="A raw pod template to run instead of a preset."
    )
    config: Optional[str] = Field(
        None, description="Name of a ConfigMap holding inference_config.yaml (defaults when absent)."
    )
    adapters: Optional[list[AdapterSpec]] = Field(None, description="LoRA adapters applied to the preset model.")


class TuningSpec(_Model):
    preset: PresetSpec = Field(..., description="Model preset to tune.")
    method: Literal["lora", "qlora"] = Field(..., description="Tuning method.")
    config: Optional[str] = Field(
        None, description="Name of a ConfigMap holding training_config.yaml (Kaito's default when absent)."
    )
    input: DataSource = Field(..., description="Training data: exactly one of urls, image, volumeSource.")
    output: DataDestination = Field(..., description="Where the adapter goes: image + imagePushSecret, or volumeSource.")


class Condition(_Model):
    type: str = Field(..., description="Condition type, e.g. ResourceReady.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: Optional[str] = Field(None, description="CamelCase reason.")
    message: Optional[str] = Field(None, description="Human-readable detail.")
    last_transition_time: Optional[str] = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: Optional[int] = Field(None, description="metadata.generation the condition was set for.")


class WorkspaceStatus(_Model):
    worker_nodes: Optional[list[str]] = Field(None, description="Nodes the workload runs on.")
    conditions: Optional[list[Condition]] = Field(None, description="Progress of the workspace.")


class Workspace(_Model):
    """A Kaito Workspace: GPU nodes plus an inference service or a tuning job."""

    api_version: Optional[str] = Field(None, description="kaito.sh/v1alpha1 or kaito.sh/v1beta1.")
    kind: Optional[str] = Field(None, description="Workspace.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    resource: ResourceSpec = Field(..., description="GPU nodes the workspace needs.")
    inference: Optional[InferenceSpec] = Field(None, description="Serve a model (exclusive with tuning).")
    tuning: Optional[TuningSpec] = Field(None, description="Tune a model (exclusive with inference).")
    status: Optional[WorkspaceStatus] = Field(None, description="Written by the operator.")

    @property
    def name(self) -> str:
        return self.metadata.get("name", "")

    @property
    def namespace(self) -> str:
        return self.metadata.get("namespace") or "default"

    @property
    def annotations(self) -> dict[str, str]:
        return self.metadata.get("annotations") or {}


# One model per served version; both are the classic schema (see module docstring).
MODELS: dict[str, type[Workspace]] = {v: Workspace for v in VERSIONS}
