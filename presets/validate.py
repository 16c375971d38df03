"""Shared value rules: Kubernetes (DNS) names, the URLs a job may fetch, and how URLs are shown.

The one home of these rules (house style: one home per rule). Called by the
preset schema (`kaito.presets.spec`, preset names and aliases) and by the
operator's admission (`kaito.operator.admission`: workspace, adapter and
secret names, tuning input URLs); other packages import them from here.
`redact` (URLs in logs and errors) is used by kaito.image_builder.oci.remote
and .transport, kaito.presets.download and kaito.tuning.fetch; `is_loopback`
(registries served over plain http by default) by kaito.image_builder.oci.remote.
Each check returns None when the value is fine, else a sentence saying what
is wrong and how to fix it, so callers prefix it with the field name.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import urlsplit

# Kubernetes' own patterns (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253
URL_SCHEMES = ("http", "https")
LOOPBACK = ("127.", "localhost", "[::1]")
"""Host prefixes of loopback registries: `is_loopback`."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def dns_label_problem(value: object, max_len: int = LABEL_MAX, letter_first: bool = False) -> Optional[str]:
    """Problem with a DNS-1123 label (DNS-1035 when `letter_first`, as Service names need), or None."""
    if not isinstance(value, str) or not value:
        return "is required: a lowercase DNS-1123 name (letters, digits and '-')"
    pattern, kind = (DNS1035_LABEL, "DNS-1035 label") if letter_first else (DNS1123_LABEL, "DNS-1123 label")
    if len(value) > max_len:
        return f"{_short(value)} is {len(value)} characters; a {kind} here may have at most {max_len}"
    if not pattern.match(value):
        first = "start with a letter, " if letter_first else "start and "
        return (
            f"{_short(value)} is not a {kind}: use lowercase letters, digits and '-', {first}end with a letter "
            "or digit (e.g. my-workspace)"
        )
    return None


def dns_subdomain_problem(value: object, max_len: int = SUBDOMAIN_MAX) -> Optional[str]:
    """Problem with a DNS-1123 subdomain (labels joined by '.'), or None."""
    if not isinstance(value, str) or not value:
        return "is required: a lowercase DNS-1123 name (letters, digits, '-' and '.')"
    if len(value) > max_len:
        return f"{_short(value)} is {len(value)} characters; a DNS-1123 name here may have at most {max_len}"
    if not DNS1123_SUBDOMAIN.match(value):
        return (
            f"{_short(value)} is not a DNS-1123 name: use lowercase letters, digits, '-' and '.', starting and "
            "ending with a letter or digit"
        )
    return None


def http_url_problem(value: object) -> Optional[str]:
    """Problem with a URL a pod downloads from (http or https with a host), or None."""
    if not isinstance(value, str) or not value.strip():
        return "is empty; give an http(s) URL"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return f"{_short(value)} is not a valid URL ({e})"
    if parts.scheme not in URL_SCHEMES:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        return f"{_short(value)} has {scheme}; only http:// and https:// URLs are fetched"
    if not parts.hostname or any(c.isspace() for c in value):
        return f"{_short(value)} is not a valid URL: give http(s)://host/path"
    return None


def is_loopback(host: str) -> bool:
    """True for a loopback `host[:port]` (127.x, localhost, [::1])."""
    return host.startswith(LOOPBACK)


def redact(url: object) -> str:
    """Scheme, host, port and path only, for logs and errors: no userinfo, no query
    (signed-URL signatures, upload state tokens)."""
    p = urlsplit(str(url))
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" + ("?..." if p.query else "")
