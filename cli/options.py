"""The workload options every subcommand shares, and how they become a ``Workload``."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from memprop.devices import get_device
from memprop.errors import UsageError
from memprop.trace.fake import new_fake_mode
from memprop.workload import SeedConfig, Workload, call_factory, load_factory, seed_workload

_W = "Workload"
SEED = SeedConfig()
"""The built-in workload's defaults: every subcommand's defaults come from here."""

Model = Annotated[str | None, typer.Option(
    "--model", metavar="SPEC", rich_help_panel=_W,
    help="Your factory, package.module:func or path/to/file.py:func, called as "
         "func(batch_size=B[, depth=D]); default: the seed's MLP.")]
InputDim = Annotated[int, typer.Option(help="Seed MLP: input features d.", rich_help_panel=_W)]
Hidden = Annotated[int, typer.Option(help="Seed MLP: hidden width h.", rich_help_panel=_W)]
Classes = Annotated[int, typer.Option(help="Seed MLP: classes q.", rich_help_panel=_W)]
Depth = Annotated[int | None, typer.Option(
    help=f"Hidden layers (seed MLP default {SEED.depth}; passed to a factory that accepts "
         "depth).",
    rich_help_panel=_W)]
Batch = Annotated[int, typer.Option(help="Batch size.", rich_help_panel=_W)]
Activation = Annotated[str, typer.Option(help="Seed MLP: relu, gelu, tanh or sigmoid.",
                                         rich_help_panel=_W)]
Bias = Annotated[bool, typer.Option("--bias/--no-bias", help="Seed MLP: biases on the layers.",
                                    rich_help_panel=_W)]
WeightDecay = Annotated[float, typer.Option(
    help="Seed MLP: λ of the λ/2 Σ‖W‖² term added to the objective.", rich_help_panel=_W)]
Dtype = Annotated[str, typer.Option(help="Seed MLP: float32, float64, float16, bfloat16.",
                                    rich_help_panel=_W)]
Device = Annotated[str, typer.Option(help="Seed MLP: cpu, cuda or cuda:N.", rich_help_panel=_W)]
Optimizer = Annotated[str, typer.Option(help="Seed MLP: sgd, momentum or adam.",
                                        rich_help_panel=_W)]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadOptions:
    model: str | None
    input_dim: int
    hidden: int
    classes: int
    depth: int | None
    batch: int
    activation: str
    bias: bool
    weight_decay: float
    dtype: str
    device: str
    optimizer: str

    def with_size(self, *, batch: int | None = None, depth: int | None = None) -> WorkloadOptions:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if batch is not None:
            values["batch"] = batch
        if depth is not None:
            values["depth"] = depth
        return WorkloadOptions(**values)

    def seed_config(self) -> SeedConfig:
        return SeedConfig(
            input_dim=self.input_dim, hidden=self.hidden, classes=self.classes,
            depth=SEED.depth if self.depth is None else self.depth, batch=self.batch,
            activation=self.activation, bias=self.bias, weight_decay=self.weight_decay,
            dtype=self.dtype, device=self.device, optimizer=self.optimizer,
        )


def workload_options(**values: Any) -> WorkloadOptions:
    return WorkloadOptions(**values)


_SHARED: list[tuple[str, Any, Any]] = [
    ("model", Model, None),
    ("input_dim", InputDim, SEED.input_dim),
    ("hidden", Hidden, SEED.hidden),
    ("classes", Classes, SEED.classes),
    ("depth", Depth, None),
    ("batch", Batch, SEED.batch),
    ("activation", Activation, SEED.activation),
    ("bias", Bias, SEED.bias),
    ("weight_decay", WeightDecay, SEED.weight_decay),
    ("dtype", Dtype, SEED.dtype),
    ("device", Device, SEED.device),
    ("optimizer", Optimizer, SEED.optimizer),
]

F = TypeVar("F", bound=Callable[..., Any])


def with_workload_options(*, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command the options every subcommand shares (the seed MLP's sizes, --model...)
    in one place: the command takes ``options: WorkloadOptions`` and its own options; typer
    sees the shared ones first. A command that spells an option its own way (``sweep``'s lists
    of batch sizes) names it in ``exclude`` and receives the default in ``options``."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for name, p in signature.parameters.items() if name != "options"]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=annotation)
            for name, annotation, default in _SHARED if name not in exclude
        ]
        defaults = {name: default for name, _, default in _SHARED}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: default if name in exclude else kwargs.pop(name, default)
                      for name, default in defaults.items()}
            return command(options=WorkloadOptions(**values), **kwargs)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*shared, *own], return_annotation=signature.return_annotation)
        return wrapper  # type: ignore[return-value]

    return decorate


def build_workload(options: WorkloadOptions, *, fake: bool) -> Workload:
    """The workload the options name; built inside a fake-tensor mode when ``fake``."""
    if options.batch < 1:
        raise UsageError(f"--batch is {options.batch}: it must be at least 1")
    if options.depth is not None and options.depth < 1:
        raise UsageError(f"--depth is {options.depth}: it must be at least 1")
    context: Any = new_fake_mode() if fake else contextlib.nullcontext()
    if options.model is None:
        config = options.seed_config()
        config.validate()
        if not fake:
            get_device(config.device)  # a clear error now, not a CUDA traceback later
        with context:
            return seed_workload(config)
    factory = load_factory(options.model)
    with context:
        return call_factory(factory, spec=options.model, batch_size=options.batch,
                            depth=options.depth)
