"""The preset registry: loads the family data files and answers lookups.

Each `presets/catalog/<family>.yaml` registers its presets here when the
registry is first used; extra directories can be added with the
`KAITO_PRESET_PATH` environment variable (os.pathsep separated). Called by
every package through `kaito.presets.get_preset` / `list_presets`.

A preset is found by its name, an alias, or its Hugging Face repository id
(`microsoft/Phi-3-mini-4k-instruct`, as newer Kaito manifests write it); repo
ids match case-insensitively, like the hub's own URLs, and resolve to the
canonical preset name.
"""

from __future__ import annotations

import difflib
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import ValidationError

from kaito.presets.errors import InvalidInput, UnknownPreset, field_path, validation_problem
from kaito.presets.spec import PresetSpec
from kaito.presets.yamlio import read_mapping

CATALOG_DIR = Path(__file__).parent / "catalog"
VALID_KEYS = sorted(PresetSpec.model_fields)
FILE_KEYS = ("family", "defaults", "presets")


def _format_validation(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            loc = field_path(e["loc"])
            if len(e["loc"]) > 1:  # nested model: name the nested model's keys
                parent = e["loc"][0]
                nested = PresetSpec.model_fields[str(parent)].annotation
                valid = sorted(getattr(nested, "model_fields", {}))
            else:
                valid = VALID_KEYS
            lines.append(f"unknown key {loc!r}; valid keys are: {', '.join(valid)}")
        else:
            lines.append(validation_problem(e, root="(preset)"))
    return f"{where}: " + "; ".join(lines)


class PresetRegistry:
    """Validated, name-unique collection of presets with aliases."""

    def __init__(self) -> None:
        self._presets: dict[str, PresetSpec] = {}
        self._sources: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        self._repos: dict[str, str] = {}  # lowercased hf_repo -> preset name

    def register(self, spec: PresetSpec, source: str = "<code>") -> PresetSpec:
        for name in (spec.name, *spec.aliases):
            owner = self._sources.get(name) or self._sources.get(self._aliases.get(name, ""))
            if name in self._presets or name in self._aliases:
                raise InvalidInput(
                    f"duplicate preset name {name!r}: declared in {owner} and again in {source}; names must be unique"
                )
        repo = spec.hf_repo.lower() if spec.hf_repo else None
        if repo and repo in self._repos:
            other = self._repos[repo]
            raise InvalidInput(
                f"duplicate hf_repo {spec.hf_repo!r}: preset {other} ({self._sources[other]}) and {spec.name} "
                f"({source}) both name it; a repository id must resolve to one preset"
            )
        self._presets[spec.name] = spec
        self._sources[spec.name] = source
        for a in spec.aliases:
            self._aliases[a] = spec.name
        if repo:
            self._repos[repo] = spec.name
        return spec

    def register_data(self, entry: dict[str, Any], source: str) -> PresetSpec:
        if not isinstance(entry, dict):
            raise InvalidInput(f"{source}: each preset must be a mapping, got {type(entry).__name__}")
        where = f"{source}: preset {entry.get('name', '?')!r}"
        try:
            spec = PresetSpec.model_validate(entry)
        except ValidationError as e:
            raise InvalidInput(_format_validation(e, where)) from None
        return self.register(spec, source)

    def load_file(self, path: Path) -> list[PresetSpec]:
        doc = read_mapping(path, f"a mapping with keys {', '.join(FILE_KEYS)}", name=f"preset file {path}")
        unknown = set(doc) - set(FILE_KEYS)
        if unknown:
            raise InvalidInput(
                f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; valid keys are: {', '.join(FILE_KEYS)}"
            )
        defaults, entries = doc.get("defaults") or {}, doc.get("presets") or []
        if not isinstance(defaults, dict):
            raise InvalidInput(f"{path}: defaults must be a mapping of preset fields, got {type(defaults).__name__}")
        if not isinstance(entries, list):
            raise InvalidInput(f"{path}: presets must be a list of preset mappings, got {type(entries).__name__}")
        family = doc.get("family")
        out = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InvalidInput(f"{path}: presets[{i}] must be a mapping, got {type(entry).__name__}")
            merged = {**defaults, **({"family": family} if family else {}), **entry}
            for key in ("gpu", "run_params"):  # nested defaults merge one level deep
                if isinstance(defaults.get(key), dict) and isinstance(entry.get(key), dict):
                    merged[key] = {**defaults[key], **entry[key]}
            out.append(self.register_data(merged, str(path)))
        return out

    def load_dir(self, directory: Path) -> None:
        for path in sorted(directory.glob("*.yaml")):
            self.load_file(path)

    def resolve(self, name: str) -> str:
        """Canonical preset name for a name, alias or Hugging Face repo id (unknown names come back as given)."""
        if "/" in name:
            return self._repos.get(name.lower(), name)
        return self._aliases.get(name, name)

    def get(self, name: str) -> PresetSpec:
        canonical = self.resolve(name)
        try:
            return self._presets[canonical]
        except KeyError:
            known = sorted([*self._presets, *self._aliases, *(p.hf_repo for p in self._presets.values() if p.hf_repo)])
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownPreset(
                f"unknown preset {name!r}{hint} (`kaito presets list` shows all {len(self._presets)})"
            ) from None

    def source_of(self, name: str) -> str:
        return self._sources[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._presets)

    def all(self) -> list[PresetSpec]:
        return [self._presets[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) in self._presets

    def __len__(self) -> int:
        return len(self._presets)


def _extra_dirs() -> Iterable[Path]:
    for part in os.environ.get("KAITO_PRESET_PATH", "").split(os.pathsep):
        if part:
            yield Path(part)


_lock = threading.Lock()
_default: Optional[PresetRegistry] = None


def default_registry() -> PresetRegistry:
    """The process-wide registry: the shipped catalog plus KAITO_PRESET_PATH."""
    global _default
    with _lock:
        if _default is None:
            reg = PresetRegistry()
            reg.load_dir(CATALOG_DIR)
            for d in _extra_dirs():
                reg.load_dir(d)
            _default = reg
        return _default


def reset_default_registry() -> None:
    """Forget the loaded registry (tests that change KAITO_PRESET_PATH)."""
    global _default
    with _lock:
        _default = None


def get_preset(name: str) -> PresetSpec:
    return default_registry().get(name)


def list_presets() -> list[PresetSpec]:
    return default_registry().all()
