"""kaito.presets: the model catalog every other kaito package reads.

Public face: `get_preset`, `list_presets`, `PresetSpec`, the SKU table with
`fit`/`smallest_fit`, the tiny model factory `make_tiny`, weight sources
`materialize_weights`, and the shared error types. Imports neither torch nor
transformers (an import contract checked by `make test`).
"""

from kaito.presets.errors import InvalidInput, KaitoError, UnknownPreset
from kaito.presets.registry import PresetRegistry, default_registry, get_preset, list_presets
from kaito.presets.skus import FitResult, GPUSku, fit, fitting_skus, get_sku, sku_table, smallest_fit
from kaito.presets.spec import GPURequirements, PresetSpec, TuningMethod, kaito_disk_gib
from kaito.presets.tiny import make_tiny
from kaito.presets.version import KAITO_VERSION

__all__ = [
    "FitResult",
    "GPURequirements",
    "GPUSku",
    "InvalidInput",
    "KaitoError",
    "PresetRegistry",
    "PresetSpec",
    "TuningMethod",
    "UnknownPreset",
    "default_registry",
    "fit",
    "fitting_skus",
    "get_preset",
    "get_sku",
    "kaito_disk_gib",
    "list_presets",
    "make_tiny",
    "sku_table",
    "smallest_fit",
]

__version__ = KAITO_VERSION  # from package metadata (pyproject.toml); see presets/version.py
