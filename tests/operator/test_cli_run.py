"""`kaito operator run` as a process: Kopf's kubeconfig login, our API client, env settings, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_harness import NC, WS, Harness, load_example

pytestmark = pytest.mark.timeout(150)


async def test_operator_run_command_reconciles_via_kubeconfig(emulator: Any, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emulator.url}}],
        "users": [{"name": "dev", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "dev", "namespace": "default"}}],
    }))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KAITO_WEBHOOK_PORT": "0",
           "KAITO_REGISTRY": "reg.example/kaito", "KAITO_RETRY_SECONDS": "0.5"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    kaito = Path(sys.executable).parent / "kaito"
    log = (tmp_path / "operator.log").open("wb")  # a file, not a pipe: a full pipe would block the operator
    proc = await asyncio.create_subprocess_exec(
        str(kaito), "operator", "run", env=env, stdout=log, stderr=log,
    )
    try:
        h = Harness(emulator.k8s, state=None)
        await h.wait_for(lambda: any("kaito-operator/" in r.headers.get("User-Agent", "") or
                                     "kopf/" in r.headers.get("User-Agent", "") for r in emulator.k8s.log),
                         timeout=30, what="operator connected")
        await h.add_node("gpu-0", {"apps": "phi-3", "node.kubernetes.io/instance-type": "Standard_NC6s_v3"})
        body = load_example("workspace-phi-3-mini.yaml")
        await h.create_workspace(body)
        name = body["metadata"]["name"]
        try:
            dep = await h.wait_for(lambda: h.obj("apps/v1/deployments", "default", name), timeout=90, what="Deployment")
        except AssertionError as e:  # say what the operator was doing
            log.flush()
            raise AssertionError(f"{e}; operator log:\n{(tmp_path / 'operator.log').read_text()[-4000:]}") from None
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"].startswith("reg.example/kaito/")
        assert h.objects(NC) == []  # a Ready matching node exists: nothing to provision
        ws = await h.wait_for(lambda: ((h.obj(WS, "default", name) or {}).get("status") or {}).get("conditions") and h.obj(WS, "default", name),
                              timeout=30, what="Workspace status conditions")
        assert ws["status"]["conditions"]
        sent = [r for r in emulator.k8s.log if r.headers.get("User-Agent", "").startswith("kaito-operator/")]
        assert sent and all(r.headers.get("Authorization") == "Bearer not-a-real-token" for r in sent)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()
    err = (tmp_path / "operator.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
