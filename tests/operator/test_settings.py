"""Operator settings from KAITO_* variables through pydantic-settings: names, defaults, one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from kaito.operator.settings import OperatorSettings
from kaito.presets.errors import InvalidInput


def test_nothing_set_gives_the_dataclass_defaults() -> None:
    assert OperatorSettings.from_env({}) == OperatorSettings()


def test_every_field_is_read_from_its_kaito_variable() -> None:
    changed = {
        "registry": ("reg.example/kaito", "reg.example/kaito"),
        "puller_image": ("reg.example/puller:1", "reg.example/puller:1"),
        "bring_your_own_nodes": ("yes", True),
        "weights_from_modelpack": ("1", True),
        "node_pool": ("gpu", "gpu"),
        "max_replicas": ("4", 4),
        "resync_seconds": ("2.5", 2.5),
        "readiness_timeout_override_seconds": ("3", 3.0),
        "webhook_port": ("0", 0),
        "webhook_cert_dir": ("", None),  # empty: plain HTTP
        "api_timeout_seconds": ("7", 7.0),
        "api_attempts": ("2", 2),
    }
    env = {f"KAITO_{name.upper()}": raw for name, (raw, _) in changed.items()}
    settings = OperatorSettings.from_env({**env, "UNRELATED": "x", "KAITO_NOT_A_SETTING": "y"})
    for name, (_, want) in changed.items():
        assert getattr(settings, name) == want, name
    untouched = {f.name for f in dataclasses.fields(OperatorSettings)} - set(changed)
    for name in untouched:
        assert getattr(settings, name) == getattr(OperatorSettings(), name), name


@pytest.mark.parametrize(
    "env,words",
    [
        ({"KAITO_WEBHOOK_PORT": "https"}, "KAITO_WEBHOOK_PORT='https': Input should be a valid integer"),
        ({"KAITO_WEBHOOK_PORT": "70000"}, "KAITO_WEBHOOK_PORT='70000': Input should be less than or equal to 65535"),
        ({"KAITO_MAX_REPLICAS": "0"}, "KAITO_MAX_REPLICAS='0': Input should be greater than or equal to 1"),
        (
            {"KAITO_BRING_YOUR_OWN_NODES": "maybe"},
            "KAITO_BRING_YOUR_OWN_NODES='maybe': Input should be a valid boolean",
        ),
        ({"KAITO_RESYNC_SECONDS": "-1"}, "KAITO_RESYNC_SECONDS='-1': Input should be greater than 0"),
    ],
)
def test_an_invalid_value_is_one_line_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        OperatorSettings.from_env(env)
    assert str(info.value).startswith(words) and "\n" not in str(info.value), str(info.value)


def test_the_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAITO_NODE_POOL", "from-the-env")
    assert OperatorSettings.from_env().node_pool == "from-the-env"
    assert OperatorSettings.from_env({}).node_pool == "kaito"  # an explicit mapping is all that is read


def test_operator_run_with_a_bad_setting_is_one_line(tmp_path: object) -> None:
    env = {"KAITO_WEBHOOK_PORT": "x", "KUBERNETES_SERVICE_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "kaito.presets.cli", "operator", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "KAITO_WEBHOOK_PORT='x'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
