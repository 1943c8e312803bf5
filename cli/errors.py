"""The one place where an error becomes a message and an exit code.

Every subcommand runs inside :class:`MemPropGroup`'s ``invoke``: a ``MemPropError`` is one line
on stderr and its ``exit_code`` (2 bad input, 3 it does not fit, 1 a bug memprop caught itself);
an out-of-memory error from torch or the CPU allocator is exit 3. Anything else is a bug and
keeps its traceback (exit 1). ``--debug`` prints the traceback of every error, the user's model's
included, before the line. The command line's own parsing errors (an unknown flag, ``--steps
abc``, an extra argument), which typer would draw as a box of five lines, are one line and exit
2 as well.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from memprop.blame import is_out_of_memory
from memprop.errors import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, MemPropError, ModelError

__all__ = ["DEBUG", "MemPropGroup"]

DEBUG = "memprop.debug"
"""The key of ``--debug`` in the click context's ``meta`` (shared by every subcommand)."""


class MemPropGroup(TyperGroup):
    """The ``memprop`` group: runs a subcommand and turns its errors into exit codes."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # memprop's own options: --bogus, --debug x
        except TyperException as error:
            _refuse_usage(error, "memprop")

    def invoke(self, ctx: Any) -> Any:  # click's Context (typer vendors click privately)
        # Fake tensors log every op that fails on them, with a traceback, before the error
        # reaches memprop, which then says it in one line: the command keeps its output clean.
        logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return self._invoke(ctx)

    def _invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TyperException as error:  # a subcommand's options, or an unknown subcommand
            _refuse_usage(error, " ".join(filter(None, ("memprop", ctx.invoked_subcommand))))
        except MemPropError as error:
            _say(ctx, error, f"memprop: error: {error}", hint=isinstance(error, ModelError))
            raise typer.Exit(code=error.exit_code) from None
        except Exception as error:
            if not is_out_of_memory(error):
                raise  # a bug: its traceback is what a report needs
            first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            _say(ctx, error, f"memprop: out of memory: {first}", hint=False)
            raise typer.Exit(code=EXIT_DOES_NOT_FIT) from None


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """memprop's own warnings (a plan's prediction off by more than its tolerance) as one line
    of the report, not Python's two lines naming memprop's source; others as Python shows them."""
    if category.__module__.split(".")[0] == "memprop":
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _say(ctx: Any, error: BaseException, line: str, *, hint: bool) -> None:
    if ctx.meta.get(DEBUG):
        traceback.print_exception(error, file=sys.stderr)
    elif hint and error.__cause__ is not None:
        line += " (--debug prints the traceback)"
    print(line, file=sys.stderr)


def _refuse_usage(error: TyperException, command: str) -> NoReturn:
    """click's parsing error (``UsageError``, ``BadParameter``...) as one line and its exit code
    (2); ``memprop`` alone still prints the help."""
    if type(error).__name__ == "NoArgsIsHelpError" or not hasattr(error, "format_message"):
        raise error
    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else command
    message = " ".join(str(error.format_message()).split())
    print(f"memprop: error: {message} ({command} --help lists the options)", file=sys.stderr)
    raise typer.Exit(code=int(getattr(error, "exit_code", EXIT_BAD_INPUT)))
