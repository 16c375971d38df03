"""`make e2e-container` as a test: what `make build-preset` builds by default serves /chat in docker.

Runs tests/e2e/container.py in a subprocess (it starts and stops its own dockerd and registry):
`make build-base`'s steps, then `make build-preset MODEL=tiny-phi-3` with no base named, then
that image in docker; and checks its report. Needs root, dockerd, mmdebstrap and docker-registry; a few minutes cold,
about half that with the rootfs and wheelhouse cached under $KAITO_E2E_CACHE.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("container.py")
TOOLS = ("dockerd", "docker", "mmdebstrap", "docker-registry")

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.mark.timeout(1800)
def test_runtime_image_serves_chat_in_a_container():
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(TOOLS)} (missing: {', '.join(missing) or 'root'})")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1750, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "OK: tiny-phi-3 served from the container" in out
    # Every step reported, in order, and the layer check passed (build-preset appends to the base).
    steps = [line.split()[0] for line in out.split("\nstep ", 1)[1].splitlines()[1:] if line.strip()]
    assert steps[:12] == ["dockerd", "rootfs", "wheelhouse", "build-base", "registry", "store-base",
                          "build-preset", "push-preset", "pull", "serve", "tuning-imports", "decode-glue"]
    assert '"Result":' in out and "appended_layers:" in out
    # `make build-preset` found the base `make build-base` stored, by default (issue 12, point 4).
    assert re.search(r"build_preset: oci:out/registry/kaito-tiny-phi-3:\S+@sha256:[0-9a-f]{64} "
                     r"on oci:out/registry/kaito-base:", out), out[-3000:]
    # The tuning Job's entry point and its data readers import in the preset image (issue 13).
    assert re.search(r'tuning_in_image: \{"pyarrow": "[0-9.]+", "peft": "[0-9.]+"\}', out), out[-3000:]
    # Without a compiler the runtime loads the glue Dockerfiles/base prebuilt, threaded (issue 15).
    assert re.search(r"decode_glue: decode glue: /\S+/kaito/runtime/kernels/decode_glue-\S+\.so \(threaded: True\)",
                     out), out[-3000:]
    # Nothing left behind: no daemon or registry of this run, no mounts, no work dir.
    work = re.search(r"work dir (/\S+),", out).group(1)
    assert work not in Path("/proc/mounts").read_text()
    leftovers = subprocess.run(["pgrep", "-af", work], capture_output=True, text=True, check=False).stdout
    assert leftovers == "", leftovers
    assert not Path(work).exists()
