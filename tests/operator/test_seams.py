"""Seams between the operator's pod specs and the programs they run, crossed without a cluster.

Each rendered command is parsed by the program it starts (the runtime's flag
parser, tuning's CLI, the `kaito` root for init containers), and the paths
and ports in it are the ones `kaito.presets.contract` names and the
runtime's defaults use: if one side changes alone, a test here fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataclasses import replace

import typer
from kaito.operator import admission, render
from kaito.operator.settings import OperatorSettings
from kaito.presets import contract, get_preset
from op_harness import load_example

SETTINGS = OperatorSettings(registry="reg.example/kaito")


def _objs(example: str, **settings: Any) -> dict[str, dict[str, Any]]:
    objs = render.render(admission.validate(load_example(example)), replace(SETTINGS, **settings), [])
    return {o["kind"]: o for o in objs}


def _pod(objs: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    return objs[kind]["spec"]["template"]["spec"]


def test_runtime_defaults_are_the_contract() -> None:
    from kaito.runtime.settings import RuntimeSettings

    defaults = RuntimeSettings()
    assert defaults.model_dir == Path(contract.WEIGHTS_DIR)
    assert defaults.adapters_dir == Path(contract.ADAPTERS_DIR)
    assert defaults.port == contract.RUNTIME_PORT


def test_rendered_runtime_command_parses_into_the_contract_paths() -> None:
    from kaito.runtime.launch import build_parser

    objs = _objs("workspace-phi-3-mini-adapter.yaml")
    container = _pod(objs, "Deployment")["containers"][0]
    command = container["command"]
    assert command[:3] == ["python", "-m", "kaito.runtime"]
    ns = build_parser().parse_args(command[3:])
    assert Path(ns.model_dir) == Path(contract.WEIGHTS_DIR)
    assert Path(ns.adapters_dir) == Path(contract.ADAPTERS_DIR)
    assert int(ns.port) == contract.RUNTIME_PORT == container["readinessProbe"]["httpGet"]["port"]
    assert Path(ns.config) == Path(contract.config_path(contract.INFERENCE_CONFIG_FILE))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == contract.CONFIG_DIR and mounts["adapter"] == contract.ADAPTERS_DIR
    assert contract.INFERENCE_CONFIG_FILE in objs["ConfigMap"]["data"]
    svc_ports = {p["name"]: p["targetPort"] for p in objs["Service"]["spec"]["ports"]}
    assert svc_ports == {"http": contract.RUNTIME_PORT, "torchrun": contract.TORCHRUN_PORT}


def test_rendered_tuning_command_parses_with_the_tuning_cli() -> None:
    from kaito.tuning.cli import tune_app

    objs = _objs("workspace-tuning-phi-3.yaml")
    pod = _pod(objs, "Job")
    trainer = pod["containers"][0]["command"]
    assert trainer[:3] == ["python", "-m", "kaito.tuning"]
    ctx = typer.main.get_command(tune_app).make_context("tune", list(trainer[3:]))
    assert ctx.params["config"] == Path(contract.config_path(contract.TRAINING_CONFIG_FILE))
    assert ctx.params["data"] == [contract.DATA_DIR] and ctx.params["output"] == Path(contract.RESULTS_DIR)
    assert ctx.params["push_secret"] == Path(contract.DOCKER_CONFIG_DIR) / "config.json"
    assert contract.TRAINING_CONFIG_FILE in objs["ConfigMap"]["data"]


def test_init_container_commands_are_kaito_cli_commands() -> None:
    """Every init container runs a `kaito` sub-command that exists, with flags it knows."""
    from kaito.presets.cli import _load_plugins, app

    _load_plugins()
    root = typer.main.get_command(app)
    pods = [
        _pod(_objs("workspace-phi-3-mini-adapter.yaml", weights_from_modelpack=True), "Deployment"),
        _pod(_objs("workspace-tuning-phi-3.yaml"), "Job"),
    ]
    seen = []
    for pod in pods:
        for init in pod.get("initContainers", []):
            assert init["command"][0] == "kaito", init
            command, args = root, list(init["command"][1:])
            # Walk the sub-commands (typer's own click classes: duck-typed), then parse the leaf's flags.
            while hasattr(command, "get_command"):
                sub = command.get_command(command.context_class(command), args[0])
                assert sub is not None, f"`kaito {' '.join(init['command'][1:])}`: no command {args[0]!r}"
                command, args = sub, args[1:]
            command.make_context(init["command"][-1], args)  # raises on an unknown flag or argument
            seen.append(init["name"])
    assert {"weights", "adapter-phi-3-adapter", "data-downloader"} <= set(seen)


def test_default_inference_config_loads_in_the_runtime(tmp_path: Path) -> None:
    """The ConfigMap the operator writes when inference.config is empty is a config the runtime accepts."""
    from kaito.runtime.settings import load_settings

    objs = _objs("workspace-phi-3-mini.yaml")
    path = tmp_path / contract.INFERENCE_CONFIG_FILE
    path.write_text(objs["ConfigMap"]["data"][contract.INFERENCE_CONFIG_FILE])
    settings = load_settings({"preset": "phi-3-mini-4k-instruct"}, path)
    assert settings.model_dir == Path(contract.WEIGHTS_DIR)


def test_operator_runs_the_base_image_the_builder_builds_presets_on() -> None:
    from kaito.image_builder.build import default_base_refs

    settings = OperatorSettings(registry="reg.example/kaito")
    assert default_base_refs("reg.example/kaito")[0] == settings.base_image == settings.puller
    preset_image = _pod(_objs("workspace-phi-3-mini.yaml"), "Deployment")["containers"][0]["image"]
    assert preset_image == get_preset("phi-3-mini-4k-instruct").image_ref("reg.example/kaito")
