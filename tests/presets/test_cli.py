"""`kaito presets ...`: output, --help examples and exit codes (0 ok, 2 bad input, 1 failure)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaito.presets.cli import main

KAITO = [sys.executable, "-m", "kaito.presets.cli"]


def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_table_and_json(capsys):
    rc, out, _ = run(["presets", "list", "-o", "json"], capsys)
    assert rc == 0
    rows = json.loads(out)
    assert {r["name"] for r in rows} >= {"phi-3-mini-4k-instruct", "tiny-phi-3"}
    rc, out, _ = run(["presets", "list"], capsys)
    assert rc == 0 and "Kaito presets (20)" in out


def test_show_yaml_and_alias(capsys):
    rc, out, _ = run(["presets", "show", "phi-3-mini", "-o", "yaml"], capsys)
    assert rc == 0
    doc = yaml.safe_load(out)
    assert doc["name"] == "phi-3-mini-4k-instruct" and doc["disk_gib"] == 80
    assert doc["hf_revision"] == "0a67737cc96d2554230f90338b163bc6380a2a85"


def test_show_unknown_is_bad_input(capsys):
    rc, _, err = run(["presets", "show", "falcon-8b"], capsys)
    assert rc == 2 and "unknown preset 'falcon-8b'" in err and "falcon-7b" in err


def test_fit_ok_and_not(capsys):
    rc, out, _ = run(["presets", "fit", "phi-3-mini-4k-instruct", "--instance-type", "Standard_NC6s_v3"], capsys)
    assert rc == 0 and "OK" in out
    rc, _, err = run(["presets", "fit", "falcon-40b-instruct", "--instance-type", "Standard_NC6s_v3"], capsys)
    assert rc == 1 and "gpu-count" in err
    rc, _, err = run(["presets", "fit", "phi-3-mini", "--instance-type", "Standard_Bogus"], capsys)
    assert rc == 2 and "supported GPU SKUs" in err


def test_usage_error_exit_2(capsys):
    rc, _, err = run(["presets", "fit", "phi-3-mini"], capsys)
    assert rc == 2 and "--instance-type" in err


def test_make_tiny_and_weights(tmp_path, capsys):
    rc, out, _ = run(["presets", "make-tiny", str(tmp_path / "m"), "--size", "tiny"], capsys)
    assert rc == 0 and (tmp_path / "m" / "model.safetensors").is_file()
    rc, _, err = run(["presets", "make-tiny", str(tmp_path / "m")], capsys)
    assert rc == 2 and "--force" in err
    rc, _, _ = run(["presets", "weights", "tiny-phi-3", str(tmp_path / "w")], capsys)
    assert rc == 0 and (tmp_path / "w" / "config.json").is_file()


@pytest.mark.parametrize("cmd", [[], ["presets"], ["presets", "list"], ["presets", "show"], ["presets", "fit"],
                                 ["presets", "make-tiny"], ["presets", "weights"]])
def test_every_command_has_help_with_example(cmd):
    out = subprocess.run([*KAITO, *cmd, "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    if cmd and cmd != ["presets"]:
        assert "Example: kaito " in out.stdout
    else:
        assert "presets" in out.stdout


def test_console_script_installed():
    exe = Path(sys.executable).parent / "kaito"
    out = subprocess.run([str(exe), "presets", "fit", "falcon-40b-instruct", "-i", "Standard_NC6s_v3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "needs 2" in out.stderr


LOGGING_PROBE = """
import logging, sys, typer
from kaito.presets.cli import invoke
app = typer.Typer()
@app.command()
def probe() -> None:
    logging.getLogger("kaito.probe").info("a log line")
    logging.getLogger("httpx").info('HTTP Request: PUT http://r/v2/x/blobs/uploads/1?_state=SECRET "HTTP/1.1 201"')
    typer.echo('{"result": 1}')
sys.exit(invoke(app, [], prog_name="probe"))
"""


def test_logs_go_to_stderr_and_only_the_result_to_stdout(tmp_path):
    env = {**os.environ, "KAITO_LOG_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-c", LOGGING_PROBE], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": 1}  # `kaito ... | jq` works
    assert "a log line" in done.stderr
    assert "_state=" not in done.stderr + done.stdout  # request lines carrying upload tokens are quiet
