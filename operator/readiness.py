"""The preset's readiness timeout: when a workload or NodeClaim has waited too long to be ready.

Called by `kaito.operator.reconcile`: `mark_started` stamps the time on a
child the operator creates or rolls, `started_at` reads it back, and
`timed_out` / `timeout_for` decide whether a not-ready child has exceeded the
preset's `readiness_timeout_seconds` (or the operator's test override).
Pure functions over plain dicts; the caller passes `now`.
"""

from __future__ import annotations

import datetime
from typing import Any

from kaito.operator.settings import OperatorSettings
from kaito.presets.spec import PresetSpec

ANN_SINCE = "kaito.sh/readiness-since"
REASON_INFERENCE = "InferenceReadinessTimeout"
REASON_NODECLAIM = "NodeClaimReadinessTimeout"
DEFAULT_TIMEOUT_SECONDS = 1800
"""PresetSpec's own default; used when a workspace names no preset (an inference template)."""

_FMT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def format_time(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime(_FMT)


def parse_time(raw: Any) -> datetime.datetime | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        t = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def mark_started(obj: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """Stamp `now` on a child about to be created or rolled (outside its spec hash)."""
    obj.setdefault("metadata", {}).setdefault("annotations", {})[ANN_SINCE] = format_time(now)
    return obj


def started_at(obj: dict[str, Any] | None) -> datetime.datetime | None:
    """When the child's wait for readiness began: our stamp, else its creationTimestamp.

    The stamp comes first because it is written by the same clock that later
    compares against it (no skew with the API server), it restarts on every
    rollout we make (a changed adapter gives the new pods the full timeout),
    and it works on servers that set no or a fake creationTimestamp (kmock,
    our emulator pins one in the past). creationTimestamp covers children
    created before this annotation existed, as on a real cluster it is always set.
    """
    meta = (obj or {}).get("metadata") or {}
    return parse_time((meta.get("annotations") or {}).get(ANN_SINCE)) or parse_time(meta.get("creationTimestamp"))


def timeout_for(preset: PresetSpec | None, settings: OperatorSettings) -> float:
    """Seconds to wait: the test override when set, else the preset's (30 min by default)."""
    if settings.readiness_timeout_override_seconds is not None:
        return float(settings.readiness_timeout_override_seconds)
    return float(preset.readiness_timeout_seconds if preset is not None else DEFAULT_TIMEOUT_SECONDS)


def timed_out(since: datetime.datetime | None, timeout_s: float, now: datetime.datetime) -> bool:
    """True once a not-ready child has waited longer than the timeout; never without a start time."""
    if since is None:
        return False
    return (now - since).total_seconds() > timeout_s


def seconds_text(timeout_s: float) -> str:
    """'1800 s', '1.5 s': stable, so a timed-out condition's message is written once."""
    return f"{timeout_s:g} s"
