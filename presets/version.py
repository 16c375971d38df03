"""The project's one version string, read from the installed package's metadata.

`pyproject.toml` is where the version is written; everything else (`kaito.presets.__version__`,
the operator's `OperatorSettings.version`, the API client's User-Agent, the base image tag)
reads it from here. A source tree used without `pip install -e .` has no metadata, so the
fallback reads `pyproject.toml` next to the package folders.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_PYPROJECT_VERSION = re.compile(r'^version\s*=\s*"([^"]+)"', re.MULTILINE)


def _from_source_tree() -> str:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        m = _PYPROJECT_VERSION.search(pyproject.read_text())
    except OSError:
        m = None
    return m.group(1) if m else "0+unknown"


def _read_version() -> str:
    try:
        return metadata.version("kaito")
    except metadata.PackageNotFoundError:
        return _from_source_tree()


KAITO_VERSION: str = _read_version()
