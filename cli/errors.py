"""The one place where memprop's errors become a message and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import typer

from memprop.errors import EXIT_DOES_NOT_FIT, MemPropError

F = TypeVar("F", bound=Callable[..., Any])


def exits_cleanly(command: F) -> F:
    """Turn a ``MemPropError`` (and a real out-of-memory) into one line on stderr and its exit
    code: 2 bad input, 3 it does not fit. Anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MemPropError as error:
            print(f"memprop: error: {error}", file=sys.stderr)
            raise typer.Exit(code=error.exit_code) from None
        except torch.OutOfMemoryError as error:
            first = str(error).splitlines()[0] if str(error) else "out of memory"
            print(f"memprop: out of memory: {first}", file=sys.stderr)
            raise typer.Exit(code=EXIT_DOES_NOT_FIT) from None

    return wrapper  # type: ignore[return-value]
