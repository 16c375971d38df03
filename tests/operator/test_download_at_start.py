"""Presets that download at start (llama-3.1-8b-instruct): the rendered pod works as written.

The Workspace names the preset by its Hugging Face repo and a modelAccessSecret;
the operator renders an init container running the base image's `kaito presets
weights` with HF_TOKEN from that Secret. Here that container runs as a local
process (each volume mount a directory, the Secret's value in the env) against
a loopback hub that requires the token: killed half way through the weights, it
resumes with a Range request on the rerun, and the runtime then loads the
result from the model dir the main container is given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kaito.operator import admission, render
from kaito.operator.settings import OperatorSettings
from kaito.presets import contract, get_preset, make_tiny
from op_harness import load_example
from support.hub import HubState, serve_hub

PRESET = get_preset("llama-3.1-8b-instruct")
TOKEN = "hf_loopback_token"
SECRETS = {"hf-token": {contract.ENV_HF_TOKEN: TOKEN}}


def _workspace() -> dict[str, Any]:
    body = load_example("workspace-phi-3-mini.yaml")
    body["metadata"]["name"] = "workspace-llama"
    body["resource"]["instanceType"] = "Standard_NC24ads_A100_v4"  # 22 GiB: more than a V100 holds
    body["inference"]["preset"] = {
        "name": "meta-llama/Llama-3.1-8B-Instruct",  # as newer Kaito manifests name it
        "presetOptions": {"modelAccessSecret": "hf-token"},
    }
    return body


def _pod_spec(settings: OperatorSettings) -> dict[str, Any]:
    objs = render.render(admission.validate(_workspace()), settings, [])
    return next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]


def _as_process(container: dict[str, Any], volumes: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The container's command and env for a local process: every volume mount becomes its directory here."""
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    def local(text: str) -> str:
        for path, directory in mounts.items():
            if text == path or text.startswith(path + "/"):
                return str(directory) + text[len(path):]
        return text

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KAITO_"))}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SECRETS[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = local(var["value"])
    command = [local(part) for part in container["command"]]
    command[0] = str(Path(sys.executable).parent / command[0])  # the image's `kaito` is this install's
    return command, env


def _wait_for_partial(part: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if part.is_file() and part.stat().st_size > 0:
            return part.stat().st_size
        time.sleep(0.05)
    raise AssertionError(f"no partial download at {part} (downloader exit code {proc.poll()})")


def test_rendered_pod_for_a_gated_preset() -> None:
    settings = OperatorSettings(registry="reg.example/kaito", hub_endpoint="http://hub.example")
    spec = _pod_spec(settings)
    (init,) = spec["initContainers"]
    main = spec["containers"][0]
    assert main["image"] == settings.base_image  # no preset image: the weights are not baked in
    assert init["image"] == settings.puller
    assert init["command"] == ["kaito", "presets", "weights", PRESET.name, contract.DOWNLOADED_WEIGHTS_DIR, "--force"]
    env = {e["name"]: e for e in init["env"]}
    assert env[contract.ENV_HF_TOKEN]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert env[contract.ENV_HF_ENDPOINT]["value"] == "http://hub.example"
    assert env[contract.ENV_HUB_CACHE]["value"].startswith(contract.WEIGHTS_DIR + "/")  # on the volume
    args = main["command"]
    assert args[args.index("--model-dir") + 1] == contract.DOWNLOADED_WEIGHTS_DIR
    assert args[args.index("--preset") + 1] == PRESET.name
    weights = next(v for v in spec["volumes"] if v["name"] == "weights")
    assert "emptyDir" in weights
    assert {"name": "weights", "mountPath": contract.WEIGHTS_DIR} in main["volumeMounts"]


@pytest.mark.slow  # two downloader processes and a model load: about 13 s on 2 cores
@pytest.mark.timeout(180)
def test_init_container_downloads_with_the_token_resumes_after_a_kill_and_the_runtime_loads(tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in make_tiny(tmp_path / "src").iterdir()}
    state = HubState(PRESET.hf_repo or "", PRESET.hf_revision or "", files, token=TOKEN, stall={"model.safetensors"})
    volume = tmp_path / "weights-volume"
    volume.mkdir()
    with serve_hub(state) as endpoint:
        spec = _pod_spec(OperatorSettings(hub_endpoint=endpoint))
        command, env = _as_process(spec["initContainers"][0], {"weights": volume})
        part = volume / ".hub-cache" / PRESET.hf_repo.replace("/", "--") / PRESET.hf_revision / "model.safetensors.part"

        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_partial(part, first)
        finally:
            first.kill()  # the node lost power mid-download
            first.wait()
        state.release.set()
        have = part.stat().st_size
        assert 0 < have < len(files["model.safetensors"])

        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("model.safetensors", f"bytes={have}-") in state.ranges  # resumed, not restarted
    assert state.unauthorized == 0, state.refused
    resolved = [h for h in state.hits if "/resolve/" in h]
    assert resolved and all(f"/resolve/{PRESET.hf_revision}/" in h for h in resolved)  # the pinned revision
    # stdout is the command's result only; logs and progress went to stderr.
    assert done.stdout.strip().splitlines() == [f"weights for {PRESET.name} in {volume / 'model'}"]
    assert "HTTP Request" not in done.stdout

    model_dir = volume / "model"
    assert (model_dir / "model.safetensors").read_bytes() == files["model.safetensors"]
    main = spec["containers"][0]
    main_cmd, _ = _as_process(main, {"weights": volume, "dshm": tmp_path, "config": tmp_path, "adapter": tmp_path})
    assert main_cmd[main_cmd.index("--model-dir") + 1] == str(model_dir)

    from kaito.runtime.loader import load
    from kaito.runtime.settings import RuntimeSettings

    loaded = load(RuntimeSettings(model_dir=model_dir, preset=PRESET.name, device="cpu"))
    assert loaded.model_name == PRESET.name
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


def test_a_wrong_token_fails_with_one_line(tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in make_tiny(tmp_path / "src").iterdir()}
    state = HubState(PRESET.hf_repo or "", PRESET.hf_revision or "", files, token="the-real-one")
    volume = tmp_path / "weights-volume"
    volume.mkdir()
    with serve_hub(state) as endpoint:
        command, env = _as_process(_pod_spec(OperatorSettings(hub_endpoint=endpoint))["initContainers"][0],
                                   {"weights": volume})
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and state.unauthorized >= 1
    assert "Traceback" not in done.stderr and TOKEN not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and PRESET.name in errors[0], done.stderr
    assert not (volume / "model").exists()
