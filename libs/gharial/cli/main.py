"""Entry point of the `gharial` command: `gharial --help` lists every command."""

from __future__ import annotations

import typer

from gharial.cli import (
    client,
    compile,
    data,
    emulate,
    license,
    live,
    model,
    perf,
    train,
    transcribe,
    up,
    validate,
)

app = typer.Typer(
    name="gharial",
    help="Gharial: open streaming speech recognition (LSTM RNN-T) — models, tools and services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.add_typer(model.app, name="model")
app.add_typer(emulate.app, name="emulate")
app.add_typer(license.app, name="license")
app.command("transcribe")(transcribe.transcribe)
app.command("train")(train.train)
app.command("export")(train.export)
app.command("validate")(validate.validate)
app.command("compile")(compile.compile_command)
app.command("client")(client.client)
app.command("up")(up.up)
app.command("perf")(perf.perf)
app.command("live")(live.live)

if __name__ == "__main__":
    app()
