"""What memprop traces: a model, its inputs, how to get a loss, and an optional optimizer.

A user's own workload comes from a factory named ``package.module:func`` or
``path/to/file.py:func``; memprop calls ``func(batch_size=B)``, adding ``depth=D`` when the function
accepts it. The factory returns ``(model, inputs)`` or a ``Workload`` (which carries targets
with the loss function they go to; ``(model, inputs, targets)`` has no loss for its targets and
is refused, as the Python API refuses targets without a ``loss_fn``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from memprop.blame import user_code
from memprop.errors import ModelError, UsageError, WorkloadError
from memprop.models import ACTIVATIONS, SeedMLP, seed_objective

__all__ = [
    "SeedConfig",
    "Workload",
    "WorkloadState",
    "as_workload",
    "load_factory",
    "restore_state",
    "save_state",
    "seed_workload",
    "to_workload",
]

LossFn = Callable[..., torch.Tensor]
Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | dict[str, torch.Tensor]
"""A model's inputs as the API takes them: a tensor, a tuple or list of tensors
(``model(*inputs)``), or a dict of tensors (``model(**inputs)``, as a Hugging Face batch)."""


@dataclass(kw_only=True)
class Workload:
    """One training step's ingredients. Not frozen: it holds a live model."""

    model: nn.Module
    """The model; its parameters and buffers are counted as such."""
    inputs: tuple[torch.Tensor, ...]
    """Positional inputs of ``model(*inputs, **keywords)``."""
    keywords: dict[str, torch.Tensor] = field(default_factory=dict)
    """Keyword inputs (a Hugging Face batch: ``input_ids``, ``attention_mask``, ``labels``)."""
    targets: torch.Tensor | None = None
    """Passed to ``loss_fn(output, targets)`` when given."""
    loss_fn: LossFn | None = None
    """``loss_fn(output[, targets])``; without one, a scalar output is the loss and any other
    output is reduced with ``.float().mean()``."""
    optimizer: torch.optim.Optimizer | None = None
    """Stepped at the end of the traced training step when given."""
    name: str = "custom"
    """How reports call the workload."""
    batch_size: int | None = None
    """The batch size the factory was asked for, when known."""
    depth: int | None = None
    """The depth the factory was asked for, when known."""
    config: dict[str, Any] = field(default_factory=dict)
    """Anything else worth reporting (the seed MLP's widths, for instance)."""

    def __post_init__(self) -> None:
        if self.optimizer is None:
            return
        # An optimizer over another copy of the model would step tensors the trace never
        # touched: its state is not this model's, and every figure would be wrong.
        owned = {id(p) for p in self.model.parameters()}
        stepped = [p for group in self.optimizer.param_groups for p in group["params"]]
        strangers = sum(id(p) not in owned for p in stepped)
        if strangers:
            raise UsageError(
                f"the optimizer's parameters are not the model's: {strangers} of its "
                f"{len(stepped)} belong to no module of {self.name} (an optimizer built over "
                "another copy of the model?): build it from this model's parameters()")

    def forward(self) -> Any:
        """``model(*inputs, **keywords)``: the model's forward as the step runs it."""
        return self.model(*self.inputs, **self.keywords)

    @property
    def input_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every input tensor, positional then keyword."""
        return (*self.inputs, *self.keywords.values())
    set_to_none: bool = True
    """How the training loop zeroes gradients between steps: ``zero_grad(set_to_none=True)``
    (torch's default) frees them; ``False`` keeps them allocated, as zeros, through the next
    step (as gradient accumulation does). See NOTE [ The steady state ] in ``memprop.loop``."""
    blocks: str | None = None
    """The qualified name of the ``nn.Sequential`` or ``nn.ModuleList`` whose items are the
    blocks to plan; None: the run found in the traced step (NOTE [ What a run of blocks is ] in
    ``memprop.trace.blocks``)."""
    chunk_head: bool = False
    """Whether the planner may compute a causal LM's head and loss in chunks of tokens, each
    recomputed in the backward (NOTE [ The head option ] in ``memprop.plan.chain``). Off unless
    asked: under it the model's output ``logits`` is a zero view (the logits are never made),
    which a loop that reads them (accuracy, sampling) must not be given silently."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SeedConfig:
    """The built-in workload: the seed's MLP on random data, with plain SGD."""

    input_dim: int = 784
    """Features per example (d)."""
    hidden: int = 512
    """Width of every hidden layer (h)."""
    classes: int = 10
    """Outputs (q)."""
    depth: int = 8
    """Hidden layers; 1 is the seed's exact network."""
    batch: int = 512
    """Examples per step."""
    activation: str = "relu"
    """φ: relu, gelu, tanh or sigmoid."""
    bias: bool = False
    """A bias on every layer (the seed's exercise 2)."""
    weight_decay: float = 0.0
    """λ of the regulariser λ/2 Σ‖W‖², added to the objective inside the graph."""
    dtype: str = "float32"
    """float32, float64, float16 or bfloat16."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    optimizer: str = "sgd"
    """sgd (no state), momentum (one buffer per parameter), adam or adamw (two)."""

    def validate(self) -> None:
        for name in ("input_dim", "hidden", "classes", "depth", "batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} is {getattr(self, name)}: "
                                 "it must be at least 1")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"--activation {self.activation!r} is not one of "
                             f"{', '.join(sorted(ACTIVATIONS))}")
        if self.dtype not in _DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r} is not one of "
                             f"{', '.join(OPTIMIZERS)}")
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise UsageError(f"--device {self.device!r} is not supported: use cpu, cuda or cuda:N")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay is {self.weight_decay}: it must be a finite "
                             "number >= 0")


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01)


def _momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
    "adamw": _adamw,
}
"""The optimizers a workload can be given by name: plain SGD (no state), SGD with momentum
0.9 (one buffer per parameter), Adam and AdamW (two moments per parameter)."""


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


def seed_workload(config: SeedConfig, *, seed: int = 0) -> Workload:
    """The seed's MLP with random inputs and labels, built on ``config.device``."""
    config.validate()
    generator = torch.Generator().manual_seed(seed)
    dtype = _DTYPES[config.dtype]
    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SeedMLP(
            input_dim=config.input_dim,
            hidden=config.hidden,
            classes=config.classes,
            depth=config.depth,
            activation=config.activation,
            bias=config.bias,
            weight_decay=config.weight_decay,
            device=device,
            dtype=dtype,
        )
    inputs = torch.randn(config.batch, config.input_dim, generator=generator, dtype=dtype)
    targets = torch.randint(0, config.classes, (config.batch,), generator=generator)
    return Workload(
        model=model,
        inputs=(inputs.to(device),),
        targets=targets.to(device),
        loss_fn=seed_objective(model),
        optimizer=OPTIMIZERS[config.optimizer](model.parameters()),
        name="seed-mlp",
        batch_size=config.batch,
        depth=config.depth,
        config={
            "input_dim": config.input_dim,
            "hidden": config.hidden,
            "classes": config.classes,
            "activation": config.activation,
            "bias": config.bias,
            "weight_decay": config.weight_decay,
            "optimizer": config.optimizer,
        },
    )


def to_workload(
    model: nn.Module | Workload,
    inputs: Inputs | None = None,
    *,
    loss_fn: LossFn | None = None,
    targets: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    set_to_none: bool | None = None,
    blocks: str | None = None,
    chunk_head: bool | None = None,
) -> Workload:
    """The one conversion of a model and its inputs (or a ``Workload``) into a ``Workload``:
    every public function that takes a model calls it, and :func:`as_workload` calls it for
    what a factory returned."""
    if isinstance(model, Workload):
        given = [name for name, value in (("inputs", inputs), ("loss_fn", loss_fn),
                                          ("targets", targets), ("optimizer", optimizer))
                 if value is not None]
        if given:
            raise UsageError(f"a Workload carries its own inputs, loss, targets and optimizer, "
                             f"and {', '.join(given)} was given too: pass the Workload alone, "
                             "or a model and its inputs")
        if set_to_none is not None:
            model.set_to_none = set_to_none
        if blocks is not None:
            model.blocks = blocks
        if chunk_head is not None:
            model.chunk_head = chunk_head
        return model
    if blocks is None:
        named = getattr(model, "memprop_chain", None)  # the older way to name the blocks
        blocks = named if isinstance(named, str) else None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model is a {type(model).__name__}: give an nn.Module or a "
                         "memprop.Workload")
    if inputs is None:
        raise UsageError("inputs are missing: give a tensor, a tuple of tensors for "
                         "model(*inputs), or a dict of tensors for model(**inputs)")
    positional, keywords = _as_inputs(inputs, what="inputs")
    if targets is not None and loss_fn is None:
        raise UsageError("targets were given without a loss_fn, so they would reach no loss: "
                         "give loss_fn (called as loss_fn(output, targets)), or drop targets")
    return Workload(model=model, inputs=positional, keywords=keywords, targets=targets,
                    loss_fn=loss_fn, optimizer=optimizer, name=type(model).__name__,
                    batch_size=_batch_of((*positional, *keywords.values())),
                    set_to_none=True if set_to_none is None else set_to_none, blocks=blocks,
                    chunk_head=bool(chunk_head))


def _batch_of(tensors: tuple[torch.Tensor, ...]) -> int | None:
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else None


def _as_inputs(inputs: Any, *, what: str
               ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(positional, keyword) inputs from a tensor, a tuple or list of tensors, or a dict."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                           for k, t in inputs.items()):
        return (), dict(inputs)
    raise UsageError(f"{what} is a {type(inputs).__name__}: give a tensor, a tuple of tensors "
                     "(model(*inputs)) or a dict of tensors (model(**inputs))")


def as_workload(
    result: Any, *, name: str, batch_size: int | None = None, depth: int | None = None
) -> Workload:
    """What a factory returned, as a ``Workload``: a ``Workload`` as it is, ``(model, inputs)``
    through :func:`to_workload` (the one conversion), named after the factory."""
    if isinstance(result, Workload):
        if result.batch_size is None:
            result.batch_size = batch_size
        if result.depth is None:
            result.depth = depth
        return result
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        if len(result) == 3:
            # As the Python API (to_workload): targets without a loss would reach no loss.
            raise WorkloadError(
                f"factory {name} returned (model, inputs, targets) but no loss function, so "
                "the targets would reach no loss: return memprop.Workload(model=..., "
                "inputs=..., targets=..., loss_fn=...) (called as loss_fn(output, targets)), "
                "or (model, inputs) to train on the output's mean")
        try:
            workload = to_workload(result[0], result[1])
        except UsageError:
            raise WorkloadError(
                f"factory {name} returned inputs of type {type(result[1]).__name__}: "
                "return a tensor, a tuple of tensors or a dict of tensors"
            ) from None
        workload.name, workload.batch_size, workload.depth = name, batch_size, depth
        return workload
    raise WorkloadError(
        f"factory {name} returned {type(result).__name__}: return (model, inputs), "
        "(model, inputs, targets) or a memprop.Workload"
    )


@contextlib.contextmanager
def defaults(*, dtype: str | None = None, device: str | None = None) -> Iterator[None]:
    """torch's default dtype and device set to ``dtype`` and ``device`` for the block: what a
    factory creates without naming them (its parameters, its random inputs) takes them."""
    if dtype is not None and dtype not in _DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(_DTYPES[dtype])
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def adjust(
    workload: Workload,
    *,
    dtype: str | None = None,
    device: str | None = None,
    optimizer: str | None = None,
) -> Workload:
    """A user's workload held to ``dtype`` and ``device`` and given the optimizer named
    ``optimizer`` (``OPTIMIZERS``), in place. Build it under :func:`defaults` first: what the
    factory made without naming a dtype or device already follows them; what it named is cast
    or moved here (floating-point inputs and targets, the model when its tensors are real). A
    workload that brings its own optimizer keeps it: naming another one is an error."""
    model = workload.model
    for wanted, current, what in ((dtype and _DTYPES[dtype], _dtype_of(model), "dtype"),
                                  (device and torch.device(device), _device_of(model), "device")):
        if wanted is None or current is None or current == wanted:
            continue
        # A fake model's dtype converts as a real one's (NOTE [ A factory's own casts on fake
        # tensors ] in memprop.trace.fake); its device does not.
        if what == "device" and any(isinstance(t, FakeTensor) for t in model.parameters()):
            raise UsageError(f"{workload.name} builds its parameters as {current} itself, which "
                             f"fake tensors cannot convert to {wanted}: drop the {what}, or "
                             "build the model with it in the factory")
        with user_code(f"moving the model to {wanted}"):
            model.to(wanted)
    if dtype is not None:
        workload.inputs = tuple(_cast(t, _DTYPES[dtype]) for t in workload.inputs)
        workload.keywords = {k: _cast(t, _DTYPES[dtype]) for k, t in workload.keywords.items()}
        if workload.targets is not None:
            workload.targets = _cast(workload.targets, _DTYPES[dtype])
    if device is not None:
        workload.inputs = tuple(t.to(device) for t in workload.inputs)
        workload.keywords = {k: t.to(device) for k, t in workload.keywords.items()}
        if workload.targets is not None:
            workload.targets = workload.targets.to(device)
    if optimizer is not None:
        if optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if workload.optimizer is not None:
            raise UsageError(f"{workload.name} brings its own optimizer "
                             f"({type(workload.optimizer).__name__}), so {optimizer!r} cannot be "
                             "applied: drop the optimizer's name, or return none from the factory")
        workload.optimizer = OPTIMIZERS[optimizer](model.parameters())
    return workload


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _device_of(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_factory(spec: str) -> Callable[..., Any]:
    """The function named by ``package.module:func`` or ``path/to/file.py:func``.

    As ``python`` would: a module is looked up from the current folder first, and a file's own
    folder is on the path while it imports, so that it can import its siblings."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(
            f"--model {spec!r} is not a factory spec: write package.module:func or "
            "path/to/file.py:func"
        )
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise WorkloadError(f"--model {spec!r}: file {path} does not exist")
            package = _package_of(path)
            if package is not None:
                module = _import_from_package(path, *package, spec=spec)
                return _function(module, module_name, func_name, spec)
            _on_path(str(path.resolve().parent))
            unique = f"_memprop_factory_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            if module_spec is None or module_spec.loader is None:
                raise WorkloadError(f"--model {spec!r}: {path} cannot be imported as Python")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            with user_code(f"importing {path}"):
                module_spec.loader.exec_module(module)
        else:
            _on_path(os.getcwd())
            with user_code(f"importing {module_name}"):
                module = importlib.import_module(module_name)
    except ModelError as error:
        missing = error.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name and (
                module_name == missing.name or module_name.startswith(missing.name + ".")):
            # The module named in the spec (not one it imports, whose line ModelError names).
            raise WorkloadError(f"--model {spec!r}: no module named {missing.name!r} (looked "
                                "in the current folder and on sys.path)") from missing
        raise WorkloadError(f"--model {spec!r}: {error}") from error.__cause__
    return _function(module, module_name, func_name, spec)


def _function(module: Any, module_name: str, func_name: str, spec: str) -> Callable[..., Any]:
    func = getattr(module, func_name, None)
    if not callable(func):
        raise WorkloadError(f"--model {spec!r}: {module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def _package_of(path: Path) -> tuple[str, str] | None:
    """``(folder, dotted name)`` when ``path`` lies in a package (its folder holds an
    ``__init__.py``): the folder above the outermost package, and the module's name from there,
    so that it imports as ``python -m`` would import it, its relative imports included."""
    file = path.resolve()
    folder, parts = file.parent, [file.stem]
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return None if len(parts) == 1 else (str(folder), ".".join(parts))


def _import_from_package(path: Path, root: str, dotted: str, *, spec: str) -> Any:
    _on_path(root)
    with user_code(f"importing {path}"):
        module = importlib.import_module(dotted)
    found = getattr(module, "__file__", None)
    if found is None or Path(found).resolve() != path.resolve():
        raise WorkloadError(f"--model {spec!r}: {path} lies in the package {dotted}, but "
                            f"importing {dotted} gives {found or 'another module'} (a package "
                            "of that name is already imported or installed): rename the "
                            "package, or name the factory as package.module:func")
    return module


def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def call_factory(
    func: Callable[..., Any], *, spec: str, batch_size: int, depth: int | None = None
) -> Workload:
    """``func(batch_size=B[, depth=D])`` as a ``Workload``; a failing factory is the user's
    error, reported in one line that names the factory's frame."""
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if not _accepts(func, "batch_size"):
        raise UsageError(f"{spec} must accept batch_size=...: memprop calls func(batch_size=B)")
    if depth is not None:
        if not _accepts(func, "depth"):
            raise UsageError(f"--depth was given but {spec} takes no 'depth' argument")
        kwargs["depth"] = depth
    arguments = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    with user_code(f"{spec}({arguments})"):
        result = func(**kwargs)
    return as_workload(result, name=spec, batch_size=batch_size, depth=depth)


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True  # no signature to read (a builtin, a C extension): let the call say
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadState:
    """A copy of everything a training step changes: parameters, buffers, gradients, the
    optimizer's state and the random generators."""

    tensors: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    optimizer: dict[str, Any] | None
    rng: tuple[torch.Tensor, list[torch.Tensor]]


def save_state(workload: Workload) -> WorkloadState:
    model = workload.model
    with torch.no_grad():
        return WorkloadState(
            tensors=[t.detach().clone() for t in (*model.parameters(), *model.buffers())],
            grads=[None if p.grad is None else p.grad.detach().clone()
                   for p in model.parameters()],
            optimizer=(None if workload.optimizer is None
                       else copy.deepcopy(workload.optimizer.state_dict())),
            rng=(torch.get_rng_state(),
                 torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []),
        )


def restore_state(workload: Workload, state: WorkloadState) -> None:
    """Put the workload back as ``save_state`` found it (the same tensor objects, new values)."""
    model = workload.model
    with torch.no_grad():
        for tensor, saved in zip((*model.parameters(), *model.buffers()), state.tensors,
                                 strict=True):
            tensor.copy_(saved)
        for parameter, grad in zip(model.parameters(), state.grads, strict=True):
            parameter.grad = None if grad is None else grad.clone()
    if workload.optimizer is not None and state.optimizer is not None:
        if state.optimizer["state"]:
            workload.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        else:
            workload.optimizer.state.clear()
    torch.set_rng_state(state.rng[0])
    if state.rng[1]:
        torch.cuda.set_rng_state_all(state.rng[1])
