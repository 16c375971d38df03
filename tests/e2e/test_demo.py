"""`make demo` as one test: every step's output is asserted, and no server is left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tests" / "e2e" / "demo.py"


def _runtime_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "kaito.runtime" in line and marker in line]


def _run_demo(tmp_path: Path, registry: str) -> dict:
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(DEMO), "--registry", registry, "--workdir", str(work)],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert _runtime_processes(str(work)) == []  # the demo stops its servers
    return summary


def _check(summary: dict) -> None:
    # 1. the catalog was shown and the preset image was built
    assert summary["catalog"] == 20
    assert summary["image"]["digest"].startswith("sha256:")
    # 2. weights pulled back; /chat and the streamed OpenAI API answered
    assert "model.safetensors" in summary["weights"] and "config.json" in summary["weights"]
    assert isinstance(summary["base_answer"], str) and summary["base_answer"].strip()
    assert summary["stream_chunks"] >= 2 and summary["streamed"]
    assert summary["usage"]["completion_tokens"] >= 1
    # 3-4. the adapter was pushed, pulled and served; it changes the answer
    assert "demo-adapter" in summary["models"]
    assert summary["adapted_answer"] != summary["base_answer"]
    # 5. the seed Workspaces rendered into their objects
    r = summary["rendered"]
    assert set(r) == {"workspace-phi-3-mini.yaml", "workspace-phi-3-mini-adapter.yaml",
                      "workspace-tuning-phi-3.yaml"}
    assert "Deployment" in r["workspace-phi-3-mini.yaml"]["kinds"]
    assert "Service" in r["workspace-phi-3-mini.yaml"]["kinds"]
    assert any("kaito-phi-3-mini-4k-instruct" in i for i in r["workspace-phi-3-mini.yaml"]["images"])
    assert any("phi-3-adapter" in c for c in r["workspace-phi-3-mini-adapter.yaml"]["init_containers"])
    assert "Job" in r["workspace-tuning-phi-3.yaml"]["kinds"]


@pytest.mark.slow
def test_demo_on_the_embedded_layout_registry(tmp_path):
    _check(_run_demo(tmp_path, str(tmp_path / "registry")))


@pytest.mark.slow
def test_demo_against_a_real_registry(tmp_path, registry):
    summary = _run_demo(tmp_path, registry.host)
    _check(summary)
    assert summary["adapter_ref"].startswith(registry.host)
