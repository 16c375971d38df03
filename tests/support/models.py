"""Tiny model fixtures shared by every test package.

`tiny_model_dir` (session scoped, < 2 MB) and `small_model_dir` (~4M params,
benchmarks and batching tests) are generated offline by kaito.presets.tiny.
Tests must not modify them; copy first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaito.presets.tiny import make_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-phi-3", size="tiny")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-phi-3-small", size="small")
