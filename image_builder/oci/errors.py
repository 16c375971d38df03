"""Errors raised by kaito.image_builder.oci; all are KaitoError so the CLI maps them to exit codes.

Raised throughout kaito.image_builder (registry errors by transport and remote;
layout, extract and tarstream errors name the blob or entry); the operator's
admission catches `BadReference`. Registry errors carry the method, the
redacted URL and the registry's own diagnostics, never credentials.
"""

from __future__ import annotations

from typing import Optional

from kaito.presets.errors import InvalidInput, KaitoError


class OCIError(KaitoError):
    """A failure while reading, writing or moving an image."""


class VerificationError(OCIError):
    """Content whose digest or size does not match its descriptor."""


class UnsafeLayer(OCIError):
    """A layer entry that would write outside the destination (or a device file)."""


class RegistryError(OCIError):
    """An HTTP error from a registry: method, redacted URL, status and the registry's error codes."""

    def __init__(self, doing: str, method: str, url: str, status: Optional[int], detail: str = "") -> None:
        self.method, self.url, self.status, self.detail = method, url, status, detail
        status_s = f"HTTP {status}" if status is not None else "no response"
        msg = f"{doing}: {method} {url}: {status_s}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class AuthError(RegistryError):
    """The registry refused our credentials (or wanted some and we had none)."""


class BadReference(InvalidInput):
    """An image reference that cannot be parsed."""
