"""The workload options every subcommand shares, validated once, and how they become workloads.

WORKLOAD is the built-in seed MLP unless ``--model`` names the user's factory. The seed MLP's
shape flags (``--input-dim --hidden --classes --activation --bias --weight-decay``) mean nothing
to a user's model: given with ``--model`` they are refused. ``--dtype``, ``--device`` and
``--optimizer`` apply to both (``memprop.workload.adjust``), ``--set-to-none`` too.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from memprop.blame import is_fake_kernel_refusal, is_fake_tensor_limit
from memprop.devices import get_device
from memprop.errors import DeviceUnavailableError, ModelError, UsageError
from memprop.estimate import Build
from memprop.trace.fake import new_fake_mode, to_fake_workload
from memprop.workload import (
    OPTIMIZERS,
    SeedConfig,
    Workload,
    adjust,
    call_factory,
    defaults,
    load_factory,
    seed_workload,
)

_W = "Workload"
SEED = SeedConfig()
"""The built-in workload's defaults: every subcommand's defaults come from here."""
MAX_SIZE = 2**48
"""The largest batch or depth accepted: beyond it tensor sizes overflow 64-bit integers."""
PIPED_WIDTH = 200
"""Columns of the report when it goes to a pipe or a file (rich assumes 80): wide enough for
every table's numbers, whole."""
SEED_ONLY = ("input_dim", "hidden", "classes", "activation", "bias", "weight_decay")
"""Flags that shape the built-in MLP and mean nothing to a user's model."""

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
Dtype = Annotated[str, typer.Option(
    help="float32, float64, float16, bfloat16 (with --model: the model and its floating-point "
         "inputs are cast).", rich_help_panel=_W)]
Device = Annotated[str, typer.Option(
    help="cpu, cuda or cuda:N (with --model: the model and its inputs are moved).",
    rich_help_panel=_W)]
Optimizer = Annotated[str | None, typer.Option(
    help=f"{', '.join(OPTIMIZERS)} (seed MLP default {SEED.optimizer}; with --model, for a "
         "factory that returns no optimizer).", rich_help_panel=_W)]
Blocks = Annotated[str | None, typer.Option(
    "--blocks", metavar="NAME", rich_help_panel=_W,
    help="The nn.Sequential or nn.ModuleList whose items the planner takes as the chain's "
         "blocks, by qualified name (transformer.h); default: the run of blocks that saves "
         "the most for backward (profile names it and the others).")]
SetToNone = Annotated[bool, typer.Option(
    "--set-to-none/--no-set-to-none", rich_help_panel=_W,
    help="How your loop zeroes gradients between steps: zero_grad(set_to_none=True), torch's "
         "default, frees them; --no-set-to-none keeps them as zeros through every step (as "
         "gradient accumulation does).")]


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
    optimizer: str | None
    set_to_none: bool
    blocks: str | None = None
    given: frozenset[str] = frozenset()
    """The options the user typed (not defaults)."""
    batch_is_factorys: bool = False
    """``batch`` is the default of the factory's own ``batch_size`` (no ``--batch`` given)."""

    def seed_config(self) -> SeedConfig:
        return SeedConfig(
            input_dim=self.input_dim, hidden=self.hidden, classes=self.classes,
            depth=SEED.depth if self.depth is None else self.depth, batch=self.batch,
            activation=self.activation, bias=self.bias, weight_decay=self.weight_decay,
            dtype=self.dtype, device=self.device, optimizer=self.optimizer or SEED.optimizer,
        )

    def validate(self) -> None:
        """Every check of the shared options, once, before any work."""
        check_size("--batch", self.batch)
        if self.blocks is not None and not self.blocks.strip():
            raise UsageError("--blocks is empty: name a container, such as transformer.h")
        if self.depth is not None:
            check_size("--depth", self.depth)
        if self.model is None:
            self.seed_config().validate()
            return
        typed = [f"--{name.replace('_', '-')}" for name in SEED_ONLY if name in self.given]
        if typed:
            raise UsageError(f"{', '.join(typed)} shape{'s' if len(typed) == 1 else ''} the "
                             f"built-in MLP, not --model {self.model}: drop "
                             f"{'it' if len(typed) == 1 else 'them'} (set your model's sizes in "
                             "its factory)")
        replace(SEED, dtype=self.dtype, device=self.device,
                optimizer=self.optimizer or SEED.optimizer).validate()


def check_size(flag: str, value: int) -> None:
    if not 1 <= value <= MAX_SIZE:
        raise UsageError(f"{flag} is {value}: it must be between 1 and 2**48 "
                         f"({MAX_SIZE:,})")


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
    ("optimizer", Optimizer, None),
    ("set_to_none", SetToNone, True),
    ("blocks", Blocks, None),
]

F = TypeVar("F", bound=Callable[..., Any])


def with_workload_options(*, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command the options every subcommand shares (the seed MLP's sizes, --model...)
    in one place: the command takes ``options: WorkloadOptions`` and its own options; typer
    sees the shared ones first. A command that spells an option its own way (``sweep``'s lists
    of batch sizes) names it in ``exclude`` and receives the default in ``options``. The
    options are validated before the command runs."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for name, p in signature.parameters.items() if name != "options"]
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY,
                                    annotation=typer.Context)
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=annotation)
            for name, annotation, default in _SHARED if name not in exclude
        ]
        defaults = {name: default for name, _, default in _SHARED}

        @functools.wraps(command)
        def wrapper(*, ctx: typer.Context, **kwargs: Any) -> Any:
            values = {name: default if name in exclude else kwargs.pop(name, default)
                      for name, default in defaults.items()}
            given = frozenset(name for name in values if name not in exclude
                              and _typed(ctx.get_parameter_source(name)))
            options = WorkloadOptions(**values, given=given)
            options.validate()
            if "batch" not in exclude:
                options = _factory_batch(options)
            if options.depth is not None:
                say_trace_time(options, options.depth)
            return command(options=options, **kwargs)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[context, *shared, *own], return_annotation=signature.return_annotation)
        return wrapper  # type: ignore[return-value]

    return decorate


DEEP = 1000
"""From this depth on, a command first says how long tracing the step will take
(``memprop.estimate.duration``): minutes to hours, where smaller depths take seconds."""


def say_trace_time(options: WorkloadOptions, depth: int) -> None:
    """For a deep workload, the time its trace will take, on stderr, before it starts."""
    if depth < DEEP:
        return
    from memprop.estimate.duration import estimate_trace

    estimate = estimate_trace(builder(options), depth)
    if estimate is not None:
        typer.echo(f"note: {estimate.sentence()}; Ctrl-C stops it", err=True)


def _factory_batch(options: WorkloadOptions) -> WorkloadOptions:
    """Without --batch, a factory's own default batch_size is the batch (the seed MLP's 512 means
    nothing to it)."""
    if options.model is None or "batch" in options.given:
        return options
    try:
        parameter = inspect.signature(load_factory(options.model)).parameters.get("batch_size")
    except (TypeError, ValueError):
        return options
    default = None if parameter is None else parameter.default
    if type(default) is not int or default < 1:
        return options
    return replace(options, batch=default, batch_is_factorys=True)


def _typed(source: Any) -> bool:
    """Whether a parameter's value came from the user (command line or environment)."""
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


@dataclass(frozen=True, slots=True)
class OptionsFactory:
    """``factory(batch_size)``: the options' workload at that batch, as a picklable object (the
    ranks of ``memprop distribute --run`` each build their own in a new process)."""

    options: WorkloadOptions

    def __call__(self, batch_size: int) -> Workload:
        return builder(self.options)(batch_size, self.options.depth)


def builder(options: WorkloadOptions) -> Build:
    """How the options make a workload of a given batch and depth: the seed MLP, or the user's
    factory with ``--dtype``, ``--device`` and ``--optimizer`` applied. The one conversion of
    options into workloads: ``build_workload``, ``sweep`` and ``fit`` all call it."""
    _check_cuda_build(options.device)
    if options.model is None:
        config = options.seed_config()

        def build_seed(batch_size: int, depth: int | None) -> Workload:
            workload = seed_workload(replace(config, batch=batch_size,
                                             depth=config.depth if depth is None else depth))
            workload.set_to_none = options.set_to_none
            workload.blocks = options.blocks or workload.blocks
            return workload

        return build_seed
    spec = options.model
    factory = load_factory(spec)
    applies = {name: getattr(options, name) for name in ("dtype", "device", "optimizer")
               if name in options.given}

    def build_model(batch_size: int, depth: int | None) -> Workload:
        with defaults(dtype=applies.get("dtype"), device=applies.get("device")):
            workload = call_factory(factory, spec=spec, batch_size=batch_size, depth=depth)
        adjust(workload, **applies)
        workload.set_to_none = options.set_to_none
        workload.blocks = options.blocks or workload.blocks
        return workload

    return build_model


def _check_cuda_build(device: str) -> None:
    """A CPU build of torch cannot make CUDA tensors, not even fake ones."""
    import torch

    if device.startswith("cuda") and not torch.backends.cuda.is_built():
        raise DeviceUnavailableError(
            f"--device {device}: this torch ({torch.__version__}) is a CPU build, which cannot "
            "make CUDA tensors, even fake ones: install a CUDA build of torch, or use "
            "--device cpu (a fake trace's bytes are the same)")


def build_workload(options: WorkloadOptions, *, fake: bool, fallback: bool = True,
                   say: Callable[[str], None] = lambda _: None) -> Workload:
    """The workload the options name, built inside a fake-tensor mode when ``fake``.

    A factory that reads tensor values while it builds the model (``.item()`` in a
    constructor, as some timm models do) cannot be built on fake tensors: with ``fallback`` it
    is then built for real and traced on a fake copy, and ``say`` is told."""
    build = builder(options)
    if options.batch_is_factorys:
        say(f"batch {options.batch}: the default of {options.model}'s batch_size (--batch "
            "sets another)")
    if options.model is None and not fake:
        get_device(options.device)  # a clear error now, not a CUDA traceback later
    if not fake:
        return build(options.batch, options.depth)
    mode = new_fake_mode()
    try:
        with mode:
            return build(options.batch, options.depth)
    except ModelError as error:
        if not (fallback and is_fake_tensor_limit(error)):
            raise
    say(f"note: {options.model} reads tensor values while it builds (fake tensors have "
        "none): it was built for real and is traced on a fake copy")
    real = build(options.batch, options.depth)
    return to_fake_workload(real, new_fake_mode())


def output_path(text: str) -> Path:
    """An output flag's path as typed (the ``parser`` of every ``--json``, ``--html``...):
    ``pathlib`` drops a trailing slash, which would turn ``--json out/`` into a file named
    ``out``, so a path that names a folder is refused here, before it is converted."""
    if text != "-" and text.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{text} ends in {text[-1]}, so it names a folder: give the "
                                 f"path of a file (such as {text}report.json), or - for "
                                 "standard output")
    if not text:
        raise typer.BadParameter("the path is empty: give a file path, or - for standard output")
    return Path(text)


def console_for(outputs: dict[str, Any]) -> Console:
    """The console for the human report: stderr when a document goes to standard output."""
    from memprop.report.output import check_outputs, writes_to_stdout

    check_outputs(outputs)
    console = Console(stderr=writes_to_stdout(outputs))
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        # A pipe or a file has no width: rich's 80 columns would cut a table's numbers.
        console = Console(stderr=writes_to_stdout(outputs), width=PIPED_WIDTH)
    return console


@contextlib.contextmanager
def working(text: str) -> Iterator[None]:
    """A spinner with ``text`` on stderr while long work runs, on a terminal only (quiet in
    pipes, files and CI logs)."""
    progress = Console(stderr=True)
    if not progress.is_terminal:
        yield
        return
    with progress.status(text):
        yield


def preflight(options: WorkloadOptions, what: str, advice: str) -> Workload | None:
    """Refuse (exit 3) a real run that a fake trace says the device cannot hold; return the
    fake workload traced (None when fake tensors cannot trace this factory: no check then)."""
    from memprop.estimate.preflight import refuse_unless_it_fits
    from memprop.trace.fake import device_of
    from memprop.trace.profile import profile

    get_device(options.device)  # no GPU for --device cuda: a clear error now
    if options.model is None:
        # The seed MLP's closed form answers at once what a deep trace takes minutes to.
        refuse_unless_it_fits(_seed_least_bytes(options), options.device, what, advice,
                              how="the closed form's least")
    try:
        with working("checking on fake tensors that the step fits"):
            fake = build_workload(options, fake=True, fallback=False)
            required = profile(fake).required_bytes
    except ModelError as error:
        if is_fake_tensor_limit(error) or is_fake_kernel_refusal(error):
            # torch's fake kernel of an op can be stricter than its real one: the real run goes
            # on unchecked, as for code that reads values; a genuine mistake in the model
            # fails it the same way, in one line.
            return None
        raise
    refuse_unless_it_fits(required, str(device_of(fake)), what, advice)
    return fake


def _seed_least_bytes(options: WorkloadOptions) -> int:
    """The least the seed MLP's step holds at once, from its closed form: the training peak
    where the formulas give it, else what is live at the end of forward (parameters, the
    optimizer's state, the inputs and the saved activations)."""
    from memprop.closed_form import SeedShape, closed_form

    config = options.seed_config()
    totals = closed_form(SeedShape(
        input_dim=config.input_dim, hidden=config.hidden, classes=config.classes,
        depth=config.depth, batch=config.batch, activation=config.activation, bias=config.bias,
        weight_decay=config.weight_decay, dtype=config.dtype, optimizer=config.optimizer))
    return totals.get("training_peak_bytes") or sum(
        totals[k] for k in ("parameters_bytes", "optimizer_state_bytes", "inputs_bytes",
                            "saved_activations_bytes"))


def parse_list(text: str, flag: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``: the one list syntax of every flag that takes several."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_sizes(text: str, flag: str) -> tuple[int, ...]:
    """``"1,64,4096"`` -> ``(1, 64, 4096)``; a clear error for anything else."""
    try:
        values = tuple(int(part) for part in parse_list(text, flag))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of integers: write it like "
                         f"{flag} 1,64,4096") from None
    if not values:
        raise UsageError(f"{flag} {text!r} is empty: write it like {flag} 1,64,4096")
    for value in values:
        check_size(flag, value)
    return tuple(dict.fromkeys(values))
