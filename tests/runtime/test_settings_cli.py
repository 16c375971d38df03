"""Settings sources and precedence, Kaito's env contract, `kaito serve` and `python -m kaito.runtime`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.procs import stop_group
from kaito.presets.errors import InvalidInput
from kaito.runtime.settings import adapter_strength, listen_port, load_settings


def test_config_file_env_and_flags_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "inference_config.yaml"
    cfg.write_text("runtime:\n  max_batch_size: 4\n  max_waiting: 7\n  port: 6000\n")
    s = load_settings({}, cfg)
    assert (s.max_batch_size, s.max_waiting, s.port) == (4, 7, 6000)
    monkeypatch.setenv("KAITO_MAX_BATCH_SIZE", "9")
    s = load_settings({"port": 7000, "preset": None}, cfg)
    assert (s.max_batch_size, s.max_waiting, s.port) == (9, 7, 7000)
    flat = tmp_path / "flat.yaml"
    flat.write_text("max_model_len: 512\n")
    assert load_settings({}, flat).max_model_len == 512


def test_bad_config_names_valid_keys(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  max_batch: 4\n")
    with pytest.raises(InvalidInput, match=r"unknown setting\(s\) \['max_batch'\].*max_batch_size"):
        load_settings({}, cfg)
    cfg.write_text("max_batch_size: -3\n")
    with pytest.raises(InvalidInput, match="max_batch_size"):
        load_settings({}, cfg)
    with pytest.raises(InvalidInput, match="no such file"):
        load_settings({}, tmp_path / "missing.yaml")
    monkeypatch.setenv("KAITO_DTYPE", "float8")
    with pytest.raises(InvalidInput, match="dtype"):
        load_settings({})


def test_kaito_env_contract(monkeypatch):
    s = load_settings({"port": 5000})
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert listen_port(s) == 5003
    monkeypatch.setenv("phi-3-adapter", "0.25")
    assert adapter_strength(s, "phi-3-adapter") == 0.25
    assert adapter_strength(load_settings({"adapter_strengths": {"other": 0.5}}), "other") == 0.5
    assert adapter_strength(s, "unset-adapter") == 1.0
    monkeypatch.setenv("phi-3-adapter", "strong")
    with pytest.raises(InvalidInput, match="phi-3-adapter"):
        adapter_strength(s, "phi-3-adapter")


def test_trust_remote_code_only_where_the_preset_allows(tiny_model_dir):
    from kaito.runtime.loader import load

    with pytest.raises(InvalidInput, match="trust_remote_code"):
        load(load_settings({"model_dir": tiny_model_dir, "preset": "tiny-phi-3", "trust_remote_code": True}))


def test_chat_template_override(tiny_model_dir, tmp_path):
    from kaito.runtime.loader import load

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    loaded = load(load_settings({"model_dir": tiny_model_dir, "chat_template": str(f)}))
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"
    with pytest.raises(InvalidInput, match="chat_template"):
        load(load_settings({"model_dir": tiny_model_dir, "chat_template": str(tmp_path / "none.jinja")}))


def test_kaito_serve_is_registered(tmp_path, capsys):
    from kaito.presets.cli import main

    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--model-dir", "--adapters-dir", "--port", "--config"):
        assert flag in out
    bad = tmp_path / "c.yaml"
    bad.write_text("nope: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "valid settings are" in capsys.readouterr().err.replace("\n", " ")


def test_python_m_entry_documents_torchrun():
    import kaito.runtime.__main__ as entry

    doc = entry.__doc__
    assert "--nproc-per-node 4" in doc and "--nnodes 2" in doc and "--master-port 29500" in doc
    r = subprocess.run([sys.executable, "-m", "kaito.runtime", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--adapters-dir" in r.stdout and "--torch_dtype" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kaito.runtime", "--max-batch-size", "0", "--model-dir", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "max_batch_size" in r.stderr


def test_one_flag_list_for_both_commands_and_unknown_flags_are_ignored(tmp_path, capsys):
    from kaito.presets.cli import main as kaito_main
    from kaito.runtime.launch import build_parser, main
    from kaito.runtime.settings import RuntimeSettings

    # Every setting is a flag, in both spellings, and `kaito serve` passes its arguments to the same parser.
    parser_flags = {o for a in build_parser()._actions for o in a.option_strings}
    for name in RuntimeSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in parser_flags and f"--{name}" in parser_flags
    # Kaito's server ignores flags it does not know: one warning line, then the usual checks go on.
    assert main(["--model-dir", str(tmp_path), "--new_arg1", "value1", "--flag_arg"]) == 1
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: ignoring unknown flag(s) --new_arg1 value1 --flag_arg (Kaito's server ignores them too)"]
    assert "config.json not found" in err
    # Kaito's phrases inside our wording, from either command.
    assert kaito_main(["serve", "--pipeline", "summarize"]) == 2
    assert "Unsupported pipeline 'summarize': use one of text-generation, conversational" in capsys.readouterr().err
    assert main(["--torch_dtype", "float8"]) == 2
    assert "Invalid torch dtype 'float8': use one of auto" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="Invalid torch dtype 'int4'"):
        load_settings({"dtype": "int4"})


@pytest.mark.parametrize("flags", [["--preset", "no-such"], ["--model-dir", "/nonexistent"]])
def test_kaito_serve_with_an_unloadable_model_exits_at_once(flags):
    import time
    from pathlib import Path

    kaito = Path(sys.executable).parent / "kaito"
    t0 = time.monotonic()
    r = subprocess.run([str(kaito), "serve", *flags, "--port", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 20
    assert ("unknown preset 'no-such'" if flags[0] == "--preset" else "/nonexistent: config.json not found") in r.stderr


@pytest.mark.slow
def test_a_model_that_fails_to_load_ends_the_process_non_zero(tmp_path):
    """Past the quick checks (config.json is there, but no model can be built from it) the load fails in the
    server's background thread: the process still exits non-zero with the error, instead of answering 503."""
    import time

    from .conftest import free_port

    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kaito.runtime", "--model-dir", str(tmp_path), "--host", "127.0.0.1",
                        "--port", str(free_port()), "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "loading the model failed" in r.stderr and "exiting" in r.stderr
    print(f"exited {time.monotonic() - t0:.1f} s after start")


def test_kaito_inference_config_template_is_accepted(tmp_path):
    # Kaito's own template (what the operator mounts by default and users' ConfigMaps hold).
    cfg = tmp_path / "inference_config.yaml"
    cfg.write_text("max_probe_steps: 6\nvllm:\n  cpu-offload-gb: 0\n  gpu-memory-utilization: 0.95\n  swap-space: 4\n"
                   "  max-model-len: 512\n")
    assert load_settings({}, cfg).max_model_len == 512
    cfg.write_text("vllm:\n  max-num-seqs: 3\nruntime:\n  max_waiting: 5\n")
    s = load_settings({}, cfg)
    assert (s.max_batch_size, s.max_waiting) == (3, 5)
    cfg.write_text("vllm: 3\n")
    with pytest.raises(InvalidInput, match="vllm"):
        load_settings({}, cfg)
    cfg.write_text("runtime:\n  port: 5001\nextra: 1\n")
    with pytest.raises(InvalidInput, match=r"unknown top-level key\(s\) \['extra'\]"):
        load_settings({}, cfg)


def test_the_operators_default_inference_config_loads():
    from pathlib import Path

    default = Path(__file__).resolve().parents[2] / "operator" / "configs" / "inference.yaml"
    assert default.is_file(), f"{default} is gone: the operator mounts it into every inference pod"
    load_settings({}, default)  # must not raise: the operator mounts it into every inference pod


@pytest.mark.slow
def test_kaito_serve_starts_a_server_with_kaitos_env_contract(tiny_model_dir, adapters_dir, tmp_path):
    import os
    import time
    from pathlib import Path

    import httpx

    from .conftest import free_port

    port = free_port()
    kaito = Path(sys.executable).parent / "kaito"
    cfg = tmp_path / "inference_config.yaml"
    cfg.write_text("max_probe_steps: 6\nvllm:\n  gpu-memory-utilization: 0.95\nruntime:\n  max_batch_size: 4\n")
    # Kaito's contract: an env var named exactly like the adapter is its strength.
    env = {**os.environ, "alpha": "0.0", "KAITO_MAX_WAITING": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(kaito), "serve", "--preset", "tiny-phi-3", "--model-dir", str(tiny_model_dir),
                             "--adapters-dir", str(adapters_dir), "--port", str(port), "--host", "127.0.0.1",
                             "--device", "cpu", "--config", str(cfg), "--enable-lora-loading"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models["alpha"]["strength"] == 0.0 and models["beta"]["strength"] == 1.0

        def out(model):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True}, timeout=30)
            return r.json()["choices"][0]["text"]

        # alpha at strength 0 is the base: raising it per request changes the answer, and the merged
        # preset model (all adapters at their strengths) equals beta alone.
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True, "adapter_strength": 1.0}, timeout=30)
        assert r.json()["choices"][0]["text"] != out("alpha")
        assert out("tiny-phi-3") == out("beta")
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        assert out("tiny-phi-3") == out("alpha")  # now only alpha (strength 0): the base
    finally:
        stop_group(proc, timeout=20)
