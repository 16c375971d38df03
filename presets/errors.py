"""Error types shared by every kaito package.

Called by all packages (presets, image_builder, runtime, tuning, operator) so
that the CLI maps failures to exit codes in one place: `InvalidInput` is the
user's to fix (exit 2), any other `KaitoError` is a failure (exit 1).
"""

from __future__ import annotations


class KaitoError(Exception):
    """A failure with a message fit for users: says what was being done."""


class InvalidInput(KaitoError, ValueError):
    """Bad input from the user: the message names the field and the fix."""


class UnknownPreset(InvalidInput, KeyError):
    """A preset name that is not in the catalog."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
