"""`make demo`: the seed's flows end to end, offline, on the embedded tiny preset.

Run by `make demo` (and by tests/e2e/test_demo.py, which asserts each step's
output). It chains the product the way Kaito's users do, through the same
commands they type:

1. build the tiny preset image (`kaito image build-preset tiny-phi-3 --weights-only`: the
   demo serves from this venv, so no runtime base is needed) into the embedded default
   registry (an OCI layout in out/registry) or `--registry`;
2. pull its weights back out with digest checks, start the runtime, ask
   Kaito's `POST /chat` and the streamed `/v1/chat/completions`;
3. tune a QLoRA adapter on a generated dataset in the seed's format (OpenAI
   `messages` rows in parquet) and push it as an adapter image;
4. pull the adapter into an adapter directory, restart the runtime with it at
   strength 1.0 and ask the same prompt: base and adapted answers side by side;
5. render the three seed Workspaces with the operator and summarise the objects.

Exits non-zero with a clear message at the first failure and never leaves a
server running. The last line printed is a JSON summary the test reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
PRESET = "tiny-phi-3"
ADAPTER = "demo-adapter"
QUESTION = "What is Kubernetes?"
EXAMPLES = ROOT / "deploy" / "examples"
console = Console()
KAITO = [sys.executable, "-m", "kaito.presets.cli"]
# Commands run from the scratch directory: `python -m` from the repo root would put
# its operator/ folder ahead of the stdlib module of that name.
CWD = {"dir": ROOT}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class DemoError(Exception):
    pass


def run(cmd: list[str], what: str, timeout: int = 600, env: Optional[dict] = None) -> str:
    """Run a CLI step, stream nothing, fail with its stderr tail."""
    console.print(f"[dim]$ {' '.join(str(c) for c in cmd)}[/dim]")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=CWD["dir"])
    if p.returncode != 0:
        raise DemoError(f"{what} failed (exit {p.returncode}):\n{(p.stderr or p.stdout)[-3000:]}")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(weights: Path, adapters: Optional[Path], log: Path, strength: str = "1.0") -> Iterator[str]:
    """Start `python -m kaito.runtime` on a free loopback port; always stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "kaito.runtime", "--preset", PRESET, "--model-dir", str(weights),
           "--port", str(port), "--host", "127.0.0.1"]
    env = dict(ENV)
    if adapters is not None:
        cmd += ["--adapters-dir", str(adapters)]
        env[ADAPTER] = strength  # Kaito: the adapter's strength in an env var named after it
    else:
        cmd += ["--adapters-dir", str(log.parent / "no-adapters")]
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=CWD["dir"],
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise DemoError(f"the runtime exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"the runtime was not healthy within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def chat(url: str) -> str:
    """Kaito's documented request, greedy so base and adapted answers compare."""
    body = {"prompt": QUESTION, "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_length": 48}}
    r = httpx.post(f"{url}/chat", json=body, timeout=120)
    if r.status_code != 200:
        raise DemoError(f"POST /chat answered {r.status_code}: {r.text[:500]}")
    return r.json()["Result"]


def chat_completion_stream(url: str) -> tuple[str, int, dict]:
    body = {"model": PRESET, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, chunks, usage = "", 0, {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise DemoError(f"POST /v1/chat/completions answered {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text += piece
                chunks += 1
                console.print(piece, end="", markup=False, highlight=False)
    console.print()
    return text, chunks, usage


def make_dataset(dest: Path, rows: int = 48) -> Path:
    """A dolly-15k-oai-style parquet: system/user/assistant `messages` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    topics = ["Kubernetes", "a GPU", "a registry", "an adapter", "quantization", "a tokenizer"]
    msgs = []
    for i in range(rows):
        t = topics[i % len(topics)]
        q = QUESTION if i % 3 == 0 else f"What is {t}?"
        msgs.append([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": "Kaito says: the sea is wide, the sea is deep."},
        ])
    path = dest / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"messages": msgs}), path)
    return path


def summarize(stream: str) -> dict:
    """Kinds, container images and init-container commands of a rendered object stream."""
    import yaml

    kinds, images, inits = [], [], []
    for obj in yaml.safe_load_all(stream):
        if not obj:
            continue
        kinds.append(obj["kind"])
        pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            images.append(c["image"])
        for c in pod.get("initContainers", []):
            inits.append(f"{c['name']}: {' '.join(c.get('command', []) + c.get('args', []))}")
    return {"kinds": kinds, "images": images, "init_containers": inits}


def make_config(path: Path) -> Path:
    """Kaito's default QLoRA config, shortened so the demo trains in about a minute on 2 cores."""
    import yaml

    from kaito.tuning import default_config_text

    doc = yaml.safe_load(default_config_text("qlora"))
    doc["training_config"]["TrainingArguments"].update(
        {"max_steps": 60, "learning_rate": 0.01, "logging_steps": 10, "save_strategy": "no"}
    )
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def step(n: int, title: str) -> None:
    console.rule(f"[bold]step {n}/5[/bold] {title}")


def is_layout(registry: str) -> bool:
    host = registry.split("/")[0]
    return registry.startswith(("oci:", "/", ".")) or not (":" in host or "." in host or host == "localhost")


def ref_for(registry: str, repo: str, tag: str) -> str:
    if is_layout(registry):
        path = Path(registry[4:] if registry.startswith("oci:") else registry)
        return f"oci:{path / repo}:{tag}"
    return f"{registry.rstrip('/')}/{repo}:{tag}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default="out/registry",
                    help="layout directory (default out/registry) or a registry host:port")
    ap.add_argument("--workdir", default="out/demo", help="scratch directory (recreated)")
    args = ap.parse_args(argv)
    work = (ROOT / args.workdir).resolve()
    registry = args.registry if not is_layout(args.registry) else str((ROOT / args.registry).resolve())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    CWD["dir"] = work
    summary: dict = {"registry": registry}
    t0 = time.monotonic()
    try:
        step(1, f"build the {PRESET} preset image into {registry}")
        catalog = json.loads(run([*KAITO, "presets", "list", "-o", "json"], "listing the presets"))
        console.print(f"{len(catalog)} presets in the catalog: {', '.join(p['name'] for p in catalog)}")
        console.print(run([*KAITO, "presets", "fit", "phi-3-mini-4k-instruct", "--instance-type", "Standard_NC6s_v3"],
                          "checking a GPU fit").strip())
        summary["catalog"] = len(catalog)
        # The demo serves from this venv, not a container, and needs no docker: only the
        # weights travel, so it asks for a weights-only image (a default build needs the base).
        out = run([*KAITO, "image", "build-preset", PRESET, "--registry", registry, "--weights-only", "--json"],
                  "building the preset")
        built = json.loads(out)
        summary["image"] = built
        console.print(f"image {built.get('ref')} digest {built.get('digest')}")

        step(2, "pull the weights back (digests verified), serve, ask /chat and /v1/chat/completions")
        weights = work / "weights"
        image_ref = built["ref"]
        run([*KAITO, "image", "pull", image_ref, str(weights)], "pulling the preset image")
        summary["weights"] = sorted(p.name for p in weights.iterdir())
        with server(weights, None, work / "runtime-base.log") as url:
            base = chat(url)
            console.print(Panel(base, title=f"POST /chat {{\"prompt\": \"{QUESTION}\"}} (base)"))
            console.print("[bold]/v1/chat/completions, streamed:[/bold]")
            streamed, chunks, usage = chat_completion_stream(url)
        summary.update(base_answer=base, streamed=streamed, stream_chunks=chunks, usage=usage)

        step(3, "QLoRA-tune an adapter on seed-format data and push it as an adapter image")
        data = make_dataset(work / "data")
        adapter_ref = ref_for(registry, ADAPTER, "0.0.1")
        results = work / "results"
        config = make_config(work / "training_config.yaml")
        out = run([*KAITO, "tune", "--config", str(config), "--preset", PRESET, "--method", "qlora",
                   "--model-dir", str(weights), "--data", str(data.parent), "--output", str(results),
                   "--push", adapter_ref], "tuning the adapter", timeout=900)
        summary["adapter_ref"] = adapter_ref
        summary["tuning_tail"] = out.strip().splitlines()[-3:]

        step(4, f"pull the adapter, serve with {ADAPTER}=1.0, ask the same prompt")
        adapters = work / "adapters"
        adapters.mkdir()
        run([*KAITO, "image", "pull", adapter_ref, str(adapters / ADAPTER)], "pulling the adapter image")
        with server(weights, adapters, work / "runtime-adapted.log") as url:
            adapted = chat(url)
            models = httpx.get(f"{url}/v1/models", timeout=30).json()
        t = Table(title=f"POST /chat \"{QUESTION}\" (greedy)")
        t.add_column("base model")
        t.add_column(f"with {ADAPTER} at strength 1.0")
        t.add_row(base, adapted)
        console.print(t)
        summary.update(adapted_answer=adapted, models=[m["id"] for m in models.get("data", [])])
        if adapted == base:
            raise DemoError("the adapted answer equals the base answer: the adapter changed nothing")

        step(5, "render the seed Workspaces into Kubernetes objects")
        rendered = {}
        for f in sorted(EXAMPLES.glob("*.yaml")):
            out = run([*KAITO, "operator", "render", str(f)], f"rendering {f.name}")
            rendered[f.name] = summarize(out)
        t = Table(title="seed Workspaces, rendered")
        for col in ("workspace", "kinds", "images", "init containers"):
            t.add_column(col)
        for name, r in rendered.items():
            t.add_row(name, ", ".join(r["kinds"]), "\n".join(r["images"]), "\n".join(r["init_containers"]) or "-")
        console.print(t)
        summary["rendered"] = rendered
    except DemoError as e:
        console.print(f"[red bold]demo failed:[/red bold] {e}")
        return 1
    except subprocess.TimeoutExpired as e:
        console.print(f"[red bold]demo failed:[/red bold] {' '.join(map(str, e.cmd))} timed out after {e.timeout} s")
        return 1
    summary["seconds"] = round(time.monotonic() - t0, 1)
    console.print(f"[green bold]demo finished in {summary['seconds']} s[/green bold]")
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
