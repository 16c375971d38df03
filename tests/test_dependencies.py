"""Honest dependencies: every third-party import of a package is declared where that
package's image gets it, and every declared dependency is used.

Each package folder installs with the core dependencies plus its own extra
(`pip install kaito[runtime]` for the runtime image, `[tuning]` for the tuning
Job, `[operator]` for the operator image, `[docker]` for the image builder's
daemon source). Imports are read with `ast` (function-level imports included,
so lazily imported packages count too) and mapped to distributions with
importlib.metadata.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_EXTRAS = {
    "presets": (),
    "image_builder": ("docker",),
    "runtime": ("runtime",),
    "tuning": ("tuning",),
    "operator": ("operator",),
}
# Declared but never imported by name: what uses each, so the list stays reviewed.
INDIRECT = {
    "runtime": {
        "accelerate": "transformers' device_map='auto' (runtime/loader.py)",
        "uvloop": "uvicorn's event loop",
        "httptools": "uvicorn's HTTP parser",
    },
    "tuning": {"bitsandbytes": "transformers.BitsAndBytesConfig for qlora (tuning/config.py)"},
}
# Import names whose distribution is not installed in every dev environment.
IMPORT_TO_DIST = {"yaml": "pyyaml", "docker": "docker"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, req
    return _norm(m.group(1))


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@functools.lru_cache(maxsize=None)
def third_party_imports(folder: Path) -> frozenset[str]:
    """Top-level names of the non-stdlib, non-kaito modules the folder's code imports."""
    names: set[str] = set()
    for py in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return frozenset(n for n in names if n not in sys.stdlib_module_names and n not in ("kaito", "__future__"))


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _dists(module: str) -> set[str]:
    found = _packages_distributions().get(module)
    if found:
        return {_norm(d) for d in found}
    assert module in IMPORT_TO_DIST, f"cannot tell which distribution provides {module!r}: add it to IMPORT_TO_DIST"
    return {_norm(IMPORT_TO_DIST[module])}


def _declared(project: dict, extras: tuple[str, ...]) -> set[str]:
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_req_name(r) for r in reqs}


@pytest.mark.parametrize("package", sorted(PACKAGE_EXTRAS))
def test_every_import_is_declared(project, package):
    declared = _declared(project, PACKAGE_EXTRAS[package])
    missing = {m: sorted(_dists(m)) for m in third_party_imports(ROOT / package) if not (_dists(m) & declared)}
    extra = PACKAGE_EXTRAS[package][0] if PACKAGE_EXTRAS[package] else "core dependencies"
    assert not missing, f"{package} imports {missing} but pyproject's {extra} does not declare them"


@pytest.mark.parametrize("extra", sorted({e for es in PACKAGE_EXTRAS.values() for e in es}))
def test_every_extra_dependency_is_used(project, extra):
    users = [p for p, es in PACKAGE_EXTRAS.items() if extra in es]
    imported = set().union(*(_dists(m) for p in users for m in third_party_imports(ROOT / p)))
    indirect = {_norm(d) for p in users for d in INDIRECT.get(p, {})}
    unused = sorted(_req_name(r) for r in project["optional-dependencies"][extra]
                    if _req_name(r) not in imported | indirect)
    assert not unused, f"[{extra}] declares {unused}, which {users} never import (drop them or say why in INDIRECT)"


def test_every_core_dependency_is_used(project):
    imported = set().union(*(_dists(m) for p in PACKAGE_EXTRAS for m in third_party_imports(ROOT / p)))
    unused = sorted(_req_name(r) for r in project["dependencies"] if _req_name(r) not in imported)
    assert not unused, f"core dependencies {unused} are imported by no package"
