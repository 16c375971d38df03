"""The one retry policy and the one atomic-write helper (kaito.presets.retry, kaito.presets.fsio)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from kaito.presets import fsio, retry


def test_retryable_set_is_transient_statuses_only():
    for s in (408, 425, 429, 500, 502, 503, 504):
        assert retry.retryable_status(s)
    for s in (None, 200, 400, 401, 403, 404, 416, 501, 505):
        assert not retry.retryable_status(s)


def test_retry_after_parses_seconds_and_dates():
    assert retry.retry_after_seconds("3") == 3.0
    assert retry.retry_after_seconds(None) is None
    assert retry.retry_after_seconds("soon") is None
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 <= retry.retry_after_seconds(when) <= 21


def test_call_retries_transient_errors_then_returns():
    waits, tries = [], []

    def fn():
        tries.append(1)
        if len(tries) < 3:
            raise retry.TransientError("503", status=503)
        return "ok"

    assert retry.call(fn, policy=retry.Backoff(attempts=5, base=0.1), sleep=waits.append) == "ok"
    assert len(tries) == 3 and len(waits) == 2
    assert all(0 < w <= 0.2 for w in waits)


def test_call_honours_retry_after_capped():
    waits = []

    def fn():
        raise retry.TransientError("429", status=429, retry_after="1000")

    with pytest.raises(retry.TransientError):
        retry.call(fn, policy=retry.Backoff(attempts=2, cap=7), sleep=waits.append)
    assert waits == [7]


def test_call_gives_up_after_attempts_and_never_retries_other_errors():
    tries = []

    def transient():
        tries.append(1)
        raise retry.TransientError("down")

    with pytest.raises(retry.TransientError, match="down"):
        retry.call(transient, policy=retry.Backoff(attempts=3), sleep=lambda s: None)
    assert len(tries) == 3

    def fatal():
        tries.append(1)
        raise PermissionError("401")

    tries.clear()
    with pytest.raises(PermissionError):
        retry.call(fatal, sleep=lambda s: None)
    assert len(tries) == 1


def test_acall_retries_without_blocking():
    tries = []

    async def fn():
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("reset")
        return 7

    got = asyncio.run(retry.acall(fn, policy=retry.Backoff(base=0.01), transient=(ConnectionError,)))
    assert got == 7 and len(tries) == 2


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "state.json"
    fsio.atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError):
        with fsio.atomic_file(p, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == '{"a": 1}'
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind
    fsio.atomic_write_text(p, "new")
    assert p.read_text() == "new"
    with pytest.raises(ValueError):
        with fsio.atomic_file(p, "a"):
            pass
