"""The seed's Workspace manifests ship in deploy/examples, byte for byte as users have them."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "examples"
NAMES = ["workspace-phi-3-mini.yaml", "workspace-phi-3-mini-adapter.yaml", "workspace-tuning-phi-3.yaml"]


def test_examples_are_in_the_repo():
    assert sorted(p.name for p in (ROOT / "deploy" / "examples").glob("*.yaml")) == sorted(NAMES)


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/examples beside this checkout")
@pytest.mark.parametrize("name", NAMES)
def test_examples_equal_the_seed(name):
    assert (ROOT / "deploy" / "examples" / name).read_bytes() == (SHARED / name).read_bytes()
