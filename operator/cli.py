"""`kaito operator ...`: run the operator, render a Workspace, write the CRD and install manifests.

Plugged into the root `kaito` CLI through the `kaito.cli` entry point
(`operator = "kaito.operator.cli:app"`). Kopf and the API client are
imported inside `run` only, so `kaito --help` stays fast.

Examples:
  kaito operator render ../shared/examples/workspace-phi-3-mini.yaml
  kaito operator crd --out-dir .          # writes deploy/crd/ and charts/kaito/crds/
  kaito operator manifests --out-dir .    # writes deploy/operator.yaml
  kaito operator run                      # in-cluster or with ~/.kube/config
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from kaito.presets.errors import InvalidInput, KaitoError

app = typer.Typer(help="The Kaito operator: reconcile Workspaces into GPU nodes, services and tuning jobs.",
                  no_args_is_help=True)

CRD_PATHS = ("deploy/crd/kaito.sh_workspaces.yaml", "charts/kaito/crds/kaito.sh_workspaces.yaml")
MANIFESTS_PATH = "deploy/operator.yaml"


def _write_or_check(root: Path, rel: str, text: str, check: bool) -> bool:
    path = root / rel
    if check:
        return path.is_file() and path.read_text() == text
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    typer.echo(f"wrote {path}")
    return True


@app.command("crd")
def crd(
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Repository root to write deploy/crd and charts/kaito/crds under.")
    ] = Path("."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the files on disk are stale instead of writing."),
) -> None:
    """Generate the Workspace CRD from the pydantic schema (`make crd`)."""
    from kaito.operator.crd import crd_yaml

    text = crd_yaml()
    stale = [rel for rel in CRD_PATHS if not _write_or_check(out_dir, rel, text, check)]
    if stale:
        raise KaitoError(f"stale CRD file(s): {', '.join(stale)}; run `kaito operator crd --out-dir .`")


@app.command("manifests")
def manifests(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Repository root to write deploy/operator.yaml under.")] = Path("."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if deploy/operator.yaml is stale."),
) -> None:
    """Generate the install manifests (RBAC, Deployment, webhook) with default values."""
    from kaito.operator.deploy import manifests_yaml

    if not _write_or_check(out_dir, MANIFESTS_PATH, manifests_yaml(), check):
        raise KaitoError(f"stale {MANIFESTS_PATH}; run `kaito operator manifests --out-dir .`")


@app.command("render")
def render_cmd(
    file: Annotated[Path, typer.Argument(help="Workspace YAML (e.g. ../shared/examples/workspace-phi-3-mini.yaml).")],
    namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace the workspace lives in."),
    registry: str | None = typer.Option(None, "--registry", help="Preset image registry (default: operator setting)."),
    ready_nodes: int = typer.Option(0, "--ready-nodes", help="Pretend this many matching nodes are Ready."),
) -> None:
    """Validate a Workspace and print the objects the operator would create."""
    from dataclasses import replace

    from kaito.operator import admission, nodes
    from kaito.operator.render import render
    from kaito.operator.settings import OperatorSettings

    try:
        raw = file.read_bytes()
    except OSError as e:
        raise InvalidInput(f"reading workspace {file}: {e.strerror or e}") from None
    body = admission.load_manifest(raw, str(file))
    if isinstance(body.get("metadata"), dict):  # a bad metadata is admission's to report
        body["metadata"].setdefault("namespace", namespace)
    settings = OperatorSettings.from_env()
    ws = admission.validate(body, max_replicas=settings.max_replicas)
    if registry:
        settings = replace(settings, registry=registry)
    fake_nodes = [
        {
            "metadata": {
                "name": f"node-{i}",
                "labels": {**(ws.resource.label_selector.match_labels or {}),
                           nodes.INSTANCE_TYPE_LABEL: ws.resource.instance_type},
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i in range(ready_nodes)
    ]
    from kaito.operator.crd import dump_yaml

    sys.stdout.write(dump_yaml(render(ws, settings, fake_nodes)))  # no YAML anchors: plain manifests


@app.command("run")
def run(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces (default: all).")
    ] = None,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run the operator (settings from KAITO_* environment variables)."""
    import asyncio
    import logging

    from kaito.operator.handlers import OperatorState, run_operator
    from kaito.operator.settings import OperatorSettings

    _check_cluster_access()
    # The root CLI sent logs to stderr already; only the level is the operator's choice.
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    state = OperatorState(settings=OperatorSettings.from_env())
    asyncio.run(run_operator(state, namespaces=namespace or None))


def _check_cluster_access() -> None:
    """Fail with one line, before Kopf starts, when there is neither a service account nor a kubeconfig."""
    import os

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return  # in a pod: Kopf logs in with the service account
    paths = [os.path.expanduser(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p.strip()]
    if not paths:
        paths = [os.path.expanduser("~/.kube/config")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise KaitoError(
            f"no cluster to connect to: not running in a pod and no kubeconfig at {', '.join(missing)}; "
            "set KUBECONFIG to your cluster's kubeconfig file"
        )
