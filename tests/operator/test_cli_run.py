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
    # As a developer runs it outside a cluster: the webhook port is set (the default) but there
    # are no cert-manager certificates, so the webhook stays off and the operator still runs.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KAITO_WEBHOOK_CERT_DIR": str(tmp_path / "no-certs"),
           "KAITO_REGISTRY": "reg.example/kaito", "KAITO_RETRY_SECONDS": "0.5"}
    env.pop("KAITO_WEBHOOK_PORT", None)
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
    off = [line for line in err.splitlines() if "admission webhook off" in line]
    assert len(off) == 1 and "KAITO_WEBHOOK_CERT_DIR" in off[0], err[-3000:]


def test_operator_run_without_a_cluster_exits_with_one_line(tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    kaito = Path(sys.executable).parent / "kaito"
    done = subprocess.run([str(kaito), "operator", "run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "KUBECONFIG" in done.stderr and "Traceback" not in done.stderr


def test_webhook_is_on_only_with_a_port_and_its_certificate(tmp_path: Path, caplog: Any) -> None:
    from kaito.operator.handlers import webhook_enabled
    from kaito.operator.settings import OperatorSettings

    certs = tmp_path / "certs"
    certs.mkdir()
    assert not webhook_enabled(OperatorSettings(webhook_port=0, webhook_cert_dir=str(certs)))
    assert not caplog.records  # port 0 is a choice: nothing to say
    assert not webhook_enabled(OperatorSettings(webhook_cert_dir=str(certs)))
    assert "admission webhook off: no tls.crt or tls.key in" in caplog.text
    (certs / "tls.crt").write_text("cert")
    (certs / "tls.key").write_text("key")
    assert webhook_enabled(OperatorSettings(webhook_cert_dir=str(certs)))
    assert webhook_enabled(OperatorSettings(webhook_cert_dir=None))  # plain HTTP (tests)
