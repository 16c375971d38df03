"""Packaging and import contracts: one `kaito` import root over the top-level folders."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["presets", "image_builder", "runtime", "tuning", "operator"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("kaito-*.whl")
    return whl


def test_wheel_maps_folders_under_kaito(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in PACKAGES:
        assert f"kaito/{pkg}/__init__.py" in names
    # Every Python file of every package folder ships, sub-packages included.
    for pkg in PACKAGES:
        for py in (ROOT / pkg).rglob("*.py"):
            rel = py.relative_to(ROOT).as_posix()
            assert f"kaito/{rel}" in names, f"{rel} missing from the wheel"
    assert "kaito/presets/catalog/phi3.yaml" in names and "kaito/presets/sku_tables/azure.yaml" in names
    assert not any(n.startswith(("tests/", "kaito/tests/", "bench/")) for n in names)
    assert "kaito/__init__.py" not in names  # kaito is a namespace root
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "kaito = kaito.presets.cli:run" in text and "[kaito.cli]" in text


def test_wheel_contents_import_without_the_checkout(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "w")
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import json, kaito.presets as p, sys; "
        f"assert p.__file__.startswith({str(tmp_path / 'w')!r}), p.__file__; "
        "print(json.dumps(sorted(s.name for s in p.list_presets())))"
    )
    # -S: skip .pth files, so the editable finder cannot serve the checkout instead.
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path / 'w'}{os.pathsep}{site}"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # Every preset of every catalog file in the checkout is served by the wheel, and no other.
    import json

    import yaml
    catalog = sorted(e["name"] for f in (ROOT / "presets" / "catalog").glob("*.yaml")
                     for e in yaml.safe_load(f.read_text())["presets"])
    assert catalog and json.loads(r.stdout) == catalog


def test_import_linter_contracts():
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--config", str(ROOT / ".importlinter")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module", ["kaito.presets", "kaito.presets.cli", "kaito.operator", "kaito.image_builder"])
def test_light_packages_do_not_load_torch(module):
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "bad = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_cli_startup_loads_no_torch():
    code = (
        "import sys; from kaito.presets.cli import main; rc = main(['--help']); "
        "sys.exit(3 if 'torch' in sys.modules else rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _pyproject_version() -> str:
    import re
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert m, "pyproject.toml has no version"
    return m.group(1)


def test_one_version_everywhere():
    """pyproject.toml is the one place the version is written; the chart, the package and the
    operator's User-Agent/settings all carry the same string."""
    import yaml

    from kaito.operator import kube, settings
    from kaito.presets import __version__
    from kaito.presets.version import _from_source_tree

    version = _pyproject_version()
    chart = yaml.safe_load((ROOT / "charts/kaito/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/kaito/values.yaml").read_text())
    assert str(chart["version"]) == version and str(chart["appVersion"]) == version
    assert str(values["image"]["tag"]) == version
    assert __version__ == version == settings.OperatorSettings().version
    assert kube.USER_AGENT == f"kaito-operator/{version}"
    assert _from_source_tree() == version  # the fallback for a checkout without metadata
