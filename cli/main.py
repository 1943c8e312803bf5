"""The ``memprop`` command: a thin layer over the library (parse, call, render)."""

from __future__ import annotations

from typing import Annotated

import typer

import memprop
from memprop_cli.bench import bench_command
from memprop_cli.calibrate import calibrate_command
from memprop_cli.distribute import distribute_command
from memprop_cli.errors import DEBUG, MemPropGroup
from memprop_cli.fit import fit_command
from memprop_cli.plan import plan_command
from memprop_cli.profile import profile_command
from memprop_cli.run import run_command
from memprop_cli.sweep import sweep_command

app = typer.Typer(
    name="memprop",
    cls=MemPropGroup,  # errors become exit codes there, in one place
    help="Where PyTorch training memory goes, and how to make a training step fit a budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Docstrings wrap at 100 columns in the source: markdown joins their lines into paragraphs.
    rich_markup_mode="markdown",
)
app.command("profile")(profile_command)
app.command("sweep")(sweep_command)
app.command("fit")(fit_command)
app.command("plan")(plan_command)
app.command("run")(run_command)
app.command("distribute")(distribute_command)
app.command("bench")(bench_command)
app.command("calibrate")(calibrate_command)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"memprop {memprop.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    )] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Print the traceback of an error (your model's included) before its "
                        "one-line message.")] = False,
) -> None:
    """Where PyTorch training memory goes, and how to make a training step fit a budget."""
    ctx.meta[DEBUG] = debug


def main() -> None:
    app()
