"""`kaito serve`: the inference server as a subcommand of the root `kaito` CLI.

Registered through the `kaito.cli` entry point (`register(app)`), called by
`kaito.presets.cli`. It has no flag list of its own: every argument goes to
`kaito.runtime.launch.main`, the same parser as `python -m kaito.runtime`, so
the two commands cannot drift (`kaito serve --help` prints that list). Heavy
imports (torch, transformers, fastapi) happen inside the command only.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve(ctx: typer.Context) -> None:
        """Serve a model over Kaito's /chat and the OpenAI API (`kaito serve --help` lists every flag)."""
        from kaito.runtime.launch import main

        code = main(list(ctx.args), prog="kaito serve")
        if code:
            raise typer.Exit(code)
