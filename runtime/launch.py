"""Process start-up shared by `python -m kaito.runtime` and `kaito serve`: one flag list, one exit policy.

Both commands call `main(argv)` (`kaito.runtime.cli` passes its arguments
through untouched). The flags are generated from `RuntimeSettings`, so every
setting is a flag (`--max-batch-size` or `--max_batch_size`, plus Kaito's
`--torch_dtype`); flags Kaito's server would accept and we do not know
(`--new_arg1 value1 --flag_arg`) are ignored with one warning line, as Kaito's
server does. Then `main` checks what loading would fail on (`preflight`),
joins the torchrun group when WORLD_SIZE > 1, and either serves HTTP with
uvicorn (rank 0) or replays rank 0's steps (`kaito.runtime.distributed`).
Exit codes: 0 after a normal shutdown, 2 bad flags or settings, 1 a model that
cannot be loaded or an engine that died (the process exits within seconds so
Kubernetes restarts it; it never stays up answering 503).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import typing
from pathlib import Path

from kaito.runtime.settings import RuntimeSettings, check_dtype, check_pipeline, listen_port, load_settings, preflight

log = logging.getLogger("kaito.runtime.launch")
# Kaito's preset run_params spell these flags their own way.
ALIASES = {"dtype": ["--torch_dtype"]}
# After a fatal error, uvicorn gets this long to close connections before the process exits regardless
# (a torchrun peer that is gone can leave the shutdown broadcast blocked).
EXIT_GRACE_S = 8.0


def _checked(rule):
    def parse(value: str) -> str:
        try:
            return rule(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser(prog: str = "python -m kaito.runtime") -> argparse.ArgumentParser:
    """Every RuntimeSettings field as a flag (dashes or underscores), plus --config."""
    p = argparse.ArgumentParser(prog=prog, description="Kaito inference server (Kaito's /chat and the OpenAI API).",
                                usage="%(prog)s [--preset NAME] [--model-dir DIR] [--port PORT] [--config FILE] [FLAG ...]",
                                allow_abbrev=False,  # an unknown Kaito flag must never be read as a prefix of ours
                                epilog="Unknown flags are ignored with a warning, as Kaito's server does.")
    p.add_argument("--config", type=Path, help="YAML of settings (keys = setting names, optionally under 'runtime:')")
    types = {"dtype": _checked(check_dtype), "pipeline": _checked(check_pipeline)}
    for name, field in RuntimeSettings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + ALIASES.get(name, [])
        kw: dict = {"dest": name, "default": None, "help": (field.description or "").replace("%", "%%")}
        if field.annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(field.annotation) is dict:
            kw.update(type=json.loads, metavar="JSON")
        elif name in types:
            kw["type"] = types[name]
        p.add_argument(*flags, **kw)
    return p


def settings_from_args(ns: argparse.Namespace) -> RuntimeSettings:
    overrides = {k: v for k, v in vars(ns).items() if k != "config"}
    return load_settings(overrides, ns.config)


def serve(settings: RuntimeSettings) -> int:
    """Serve until shut down; returns the exit code (1 when the model could not load or the engine died)."""
    import uvicorn
    from kaito.runtime import distributed
    from kaito.runtime.api import build_app
    from kaito.runtime.serving import Runtime

    # `kaito serve` has already put a stderr handler on the root logger (so basicConfig would be a no-op);
    # python -m kaito.runtime has not. Either way --log-level sets the level.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level.upper())
    rank, size = distributed.init()
    if size > 1 and rank != 0:
        distributed.worker_loop(settings)  # raises (exit non-zero) when rank 0 reports a failure
        return 0
    # The engine thread runs Python between its torch ops and competes with the event loop for the GIL;
    # with the default 5 ms switch interval a busy loop (a burst of requests, 32 streams) stalls whole
    # decode steps, and every torch op of a forward waits up to one interval to get the GIL back while the
    # loop parses a burst. 0.1 ms (0.5 ms before) cut the serving bench's c=32 TTFT p50 by ~15% at equal tokens/s.
    sys.setswitchinterval(0.0001)
    rt = Runtime(settings, broadcast=distributed.send_plan if size > 1 else None,
                 tp_plan=distributed.tp_plan_for(settings))
    server = uvicorn.Server(uvicorn.Config(build_app(settings, runtime=rt), host=settings.host, port=listen_port(settings),
                                           log_level=settings.log_level.lower(), timeout_graceful_shutdown=5))
    failed: list[str] = []

    def fatal(reason: str) -> None:
        failed.append(reason)
        print(f"error: {reason}; exiting", file=sys.stderr, flush=True)
        server.should_exit = True
        timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()

    rt.on_fatal = fatal
    server.run()
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str = "python -m kaito.runtime") -> int:
    from kaito.presets.errors import InvalidInput, KaitoError

    try:
        ns, unknown = build_parser(prog).parse_known_args(argv)
    except SystemExit as e:  # --help (0) or a flag's bad value (2, message already on stderr)
        return int(e.code or 0)
    if unknown:
        print(f"warning: ignoring unknown flag(s) {' '.join(unknown)} (Kaito's server ignores them too)",
              file=sys.stderr, flush=True)
    try:
        settings = settings_from_args(ns)
        preflight(settings)
        return serve(settings)
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KaitoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
