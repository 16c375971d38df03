"""Error types shared by every kaito package.

Called by all packages (presets, image_builder, runtime, tuning, operator) so
that the CLI maps failures to exit codes in one place: `InvalidInput` is the
user's to fix (exit 2), any other `KaitoError` is a failure (exit 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class KaitoError(Exception):
    """A failure with a message fit for users: says what was being done."""


class InvalidInput(KaitoError, ValueError):
    """Bad input from the user: the message names the field and the fix."""


class UnknownPreset(InvalidInput, KeyError):
    """A preset name that is not in the catalog."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as users write it: `resource.count`, `adapters[0].source`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_problem(error: Mapping[str, Any], root: str = "(document)") -> str:
    """One item of pydantic's `ValidationError.errors()` as `field.path: message`.

    The one formatter of schema errors: used by the preset catalog
    (kaito.presets.registry), the runtime's settings, tuning's config and the
    operator's admission, each adding only its own special cases. `root` names
    the whole document when the error has no location. pydantic's
    "Value error, " prefix (our own validators' messages) is dropped.
    """
    where = field_path(error.get("loc") or ()) or root
    return f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}"
