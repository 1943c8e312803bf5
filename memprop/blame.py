"""Whose fault an exception is: the user's model, or memprop.

NOTE [ Blame ]
memprop runs the user's code (a factory, the model's forward, the loss, the backward pass, the
optimizer's step) with its own code around it and inside it: the ledger's dispatch mode sees
every op and module hooks follow every call. An exception raised there is the user's (a
:class:`memprop.errors.ModelError`, exit 2, one line naming the user's frame) unless memprop's
own code raised it, which is a bug and keeps its traceback. The innermost frame of the traceback
that belongs neither to torch nor to the standard library decides. Some memprop frames do not
count: the relays that only pass a call on (a dispatch mode's hook, the ledger's or the fake
mode's, that called deeper code: an op that fails on the user's tensors fails inside them;
``Workload.forward``, so that a model built of torch's own modules, an ``nn.Sequential`` of
``nn.Linear`` of the wrong widths, is the user's), and the frame that called the user's code
(an error that torch's C++ raises, in the autograd engine say, has no other frame). A
``SyntaxError`` names the user's file and line from the error itself: the compiler has no frame.

Out-of-memory errors are neither: they become :class:`memprop.errors.OutOfMemoryError` (exit
3), the CPU allocator's included, which raises a plain ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sysconfig
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from memprop.errors import MemPropError, ModelError, OutOfMemoryError

__all__ = ["is_fake_kernel_refusal", "is_fake_tensor_limit", "is_out_of_memory", "user_code"]

_MEMPROP = str(Path(__file__).resolve().parent) + os.sep
_TORCH = str(Path(torch.__file__).resolve().parent) + os.sep
_STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
_DISPATCH_HOOKS = ("__torch_dispatch__", "dispatch")
"""What a dispatch mode's frames are called: memprop's modes (the ledger, the fake mode) see
every op of the user's code and pass it on to torch."""
_OP_CALL = "func(*args, **kwargs)"
"""How a dispatch hook calls the op it was handed (``memprop/trace/ledger.py``)."""
_FORWARD = ("workload.py", "forward")
_MODEL_LIBRARY = ("zoo.py", "models.py")
"""memprop's own models (``memprop.zoo``, the seed MLP), which users train as their own."""
"""``Workload.forward``: ``model(*inputs, **keywords)``, nothing else."""
_HERE = os.path.realpath(__file__)

_FAKE_TENSOR_LIMITS = ("DataDependentOutputException", "DynamicOutputShapeException",
                       "GuardOnDataDependentSymNode", "UnsupportedFakeTensorException",
                       "UnsupportedOperatorException")
"""What fake tensors raise on code that reads tensor values (``.item()``, a shape that depends
on data, an op without a fake implementation)."""


def is_out_of_memory(error: BaseException) -> bool:
    """A device's out-of-memory error: CUDA's, Python's, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError, OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def is_fake_tensor_limit(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is fake tensors refusing code that reads values."""
    while error is not None:
        if type(error).__name__ in _FAKE_TENSOR_LIMITS:
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


_FAKE_TENSOR_FILE = os.path.join(_TORCH, "_subclasses", "fake_tensor.py")


def is_fake_kernel_refusal(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) was raised inside torch's fake-tensor dispatch, by
    an op's fake (meta) kernel: one that can be stricter than the real kernel (the meta kernel
    of ``grouped_mm`` asks for bfloat16, which the CPU kernel does not), so a model that fails
    there may still run on real tensors."""
    while error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        if any(os.path.realpath(frame.filename) == _FAKE_TENSOR_FILE for frame in frames):
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


def _owner(filename: str) -> str:
    path = os.path.realpath(filename) if not filename.startswith("<") else filename
    if path.startswith(_MEMPROP):
        # memprop's model library is model code, as a user's would be: what fails in its
        # forward (BatchNorm given one value per channel) is the input's doing.
        return "user" if path[len(_MEMPROP):] in _MODEL_LIBRARY else "memprop"
    if path.startswith(_TORCH) or filename.startswith("<"):
        return "torch"  # torch's files, and generated or frozen code
    if path.startswith(_STDLIB) and "site-packages" not in path:
        return "stdlib"
    return "user"


def culprit(error: BaseException) -> traceback.FrameSummary | None:
    """The user's frame to blame, or None when memprop's own code raised ``error``."""
    frames = list(traceback.extract_tb(error.__traceback__))
    if frames and os.path.realpath(frames[0].filename) == _HERE:
        frames = frames[1:]  # user_code's own frame, where the error entered the generator
    for position in range(len(frames) - 1, -1, -1):
        frame = frames[position]
        owner = _owner(frame.filename)
        if owner == "user":
            return frame
        if owner != "memprop":
            continue
        if _relays(frame, innermost=position == len(frames) - 1):
            continue
        if position == 0:
            return frame  # the call into the user's code: torch's C++ raised it
        return None
    return frames[0] if frames else None


def _relays(frame: traceback.FrameSummary, *, innermost: bool) -> bool:
    """Whether a memprop frame only passed the call on (NOTE [ Blame ]): a dispatch mode's hook
    that called deeper code (the error came from the op it passed on, not from its own
    bookkeeping) or the op that raised in C++, or ``Workload.forward``."""
    if frame.name in _DISPATCH_HOOKS:
        if not innermost:
            return True
        # The op itself, raised from C++ (real tensors): no deeper frame, the call's line.
        source = frame.line or linecache.getline(frame.filename, frame.lineno or 0)
        return _OP_CALL in source
    return (Path(frame.filename).name, frame.name) == _FORWARD


def describe(frame: traceback.FrameSummary) -> str:
    """``model.py:12 in forward: return self.fc(x)``."""
    where = f"{frame.filename}:{frame.lineno} in {frame.name}"
    if _owner(frame.filename) == "memprop":
        return ""
    line = (frame.line or "").strip()
    return f"{where}: {line}" if line else where


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's code (``what``: "the model's forward", "the loss function"...): its
    errors become a :class:`ModelError` naming the user's frame, out-of-memory errors an
    :class:`OutOfMemoryError`; memprop's own errors pass unchanged."""
    try:
        yield
    except MemPropError:
        raise
    except SystemExit as error:
        # sys.exit() in a factory or a forward would end memprop with the user's code, silently.
        frame = culprit(error)
        where = describe(frame) if frame is not None else ""
        raise ModelError(f"{what} called sys.exit({error.code!r}): memprop needs it to return "
                         "(a script's exit does not belong in a factory or a model)"
                         + (f" (at {where})" if where else "")) from error
    except Exception as error:
        if is_out_of_memory(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            raise OutOfMemoryError(f"{what} ran out of memory: {first}") from error
        name = type(error).__name__
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, SyntaxError) and error.filename:
            text = error.msg
            where = f"{error.filename}:{error.lineno}" + (
                f": {error.text.strip()}" if error.text and error.text.strip() else "")
        else:
            frame = culprit(error)
            if frame is None:
                raise  # memprop's own code: a bug, with its traceback
            where = describe(frame)
        message = f"{what} raised {name}" + (f": {text}" if text else "")
        if name in _FAKE_TENSOR_LIMITS:
            message += (" (fake tensors have shapes but no values, so code that reads values "
                        "cannot be traced on them: trace on real tensors instead)")
        elif is_fake_kernel_refusal(error):
            message += (" (on fake tensors, in torch's fake kernel of an op, which can refuse "
                        "what the real kernel runs: if the model trains in plain PyTorch, "
                        "trace it on real tensors)")
        raise ModelError(message + (f" (at {where})" if where else "")) from error
