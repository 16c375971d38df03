"""The one reader of YAML documents whose top level must be a mapping: a file or text in, a dict out.

Called by the preset catalog (`kaito.presets.registry`), the GPU SKU table
(`kaito.presets.skus`), the runtime's `--config` file (`kaito.runtime.settings`),
tuning's training config (`kaito.tuning.config`) and the operator's admission
check of a training_config.yaml (`kaito.operator.admission`). Every failure is
an `InvalidInput` that names the document the caller's way (`--config PATH`,
`preset file PATH`) and says what its top level should be; an empty document is
an empty mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from kaito.presets.errors import InvalidInput


def parse_mapping(text: str, name: str, what: str) -> dict[str, Any]:
    """The mapping in YAML `text`; `name` names the document in messages, `what` is what its top level must be."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"{name}: not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InvalidInput(f"{name}: the top level must be {what}, not {_kind(doc)}")
    return doc


def read_mapping(
    path: Union[str, Path], what: str, *, name: str | None = None, missing: str = "give an existing YAML file"
) -> dict[str, Any]:
    """The mapping in the YAML file `path`.

    `name` names the file in messages (default: its path, e.g. `--config {path}` for a flag), `what` is what
    its top level must be ("a mapping of setting names to values"), `missing` is the fix for a path with no file.
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise InvalidInput(f"{name}: no such file; {missing}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{name}: not UTF-8 text; {missing}") from None
    except OSError as e:
        raise InvalidInput(f"{name}: cannot read it ({e.strerror})") from None
    return parse_mapping(text, name, what)


def _kind(doc: Any) -> str:
    if isinstance(doc, list):
        return "a list"
    if isinstance(doc, str):
        return f"the text {doc[:40]!r}"
    if isinstance(doc, bool):
        return f"the boolean {doc}"
    if isinstance(doc, (int, float)):
        return f"the number {doc}"
    return f"a {type(doc).__name__}"  # a date or timestamp, the only other YAML scalars safe_load makes
