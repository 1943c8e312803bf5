"""Fake tensors: trace any size without allocating it.

A ``FakeTensorMode`` gives every tensor its shape, dtype, device and storage size but no data, so
the ledger records the same storages, byte for byte, as on real tensors (the tests hold it to
that). Factories run inside the mode build fake models directly; a real model is mirrored into a
fake one that shares nothing with it, so the user's model is never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprop.workload import Workload

__all__ = ["device_of", "exact_sizes_only", "fake_mode_of", "new_fake_mode", "sized_at_worst",
           "to_fake_workload", "worst_case_note"]


# NOTE [ Sizes that depend on values ]
# Fake tensors have no values, so an op whose output's size depends on them (``nonzero``, the
# routing of a mixture of experts; ``masked_select``; a boolean mask as an index) raises
# DynamicOutputShapeException in a plain fake mode. memprop's fake mode gives such an op its
# worst case instead: every element selected (``nonzero`` of an n-element mask returns n
# indices), so that a fake trace bounds the memory of every real step from above. The ops so
# sized are collected (``sized_at_worst``) for the report to say so. Where the real step can be
# traced instead (a workload of real tensors), ``exact_sizes_only()`` keeps the refusal, and the
# caller traces on real tensors: exact (the command line's pre-check, a fake trace at the worst
# case, has bounded its size by then). Code that reads a value itself (``.item()``,
# ``if mask.any():``) cannot be traced on fake tensors at all: it is traced on real tensors
# where there are some.
# Known limitation: the worst case can be far above any real step: a top-k router's mask has k
# entries per token, so each expert is sized for k times the batch, where a real step gives it
# at most the batch (the mixture of experts in the tests: 1.63 MiB at the worst, 663 KiB real).

_worst_case_ops: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "memprop_worst_case_ops", default=None)
_exact_only: contextvars.ContextVar[bool] = contextvars.ContextVar("memprop_exact_only",
                                                                   default=False)


@contextlib.contextmanager
def sized_at_worst() -> Iterator[list[str]]:
    """The names of the ops whose output sizes fake tensors took at their worst case within the
    block (NOTE [ Sizes that depend on values ]), in order of first use; blocks nest."""
    outer = _worst_case_ops.get()
    found: list[str] = []
    token = _worst_case_ops.set(found)
    try:
        yield found
    finally:
        _worst_case_ops.reset(token)
        if outer is not None:  # an enclosing block sees them too
            outer.extend(op for op in found if op not in outer)


def worst_case_note(ops: list[str]) -> str:
    """What a report says of a fake trace that sized ``ops`` at their worst case."""
    names = ", ".join(op.removeprefix("aten.").removesuffix(".default") for op in ops)
    return (f"traced on fake tensors with the outputs of {names} at their worst case (every "
            "element selected): the memory is an upper bound")


@contextlib.contextmanager
def exact_sizes_only() -> Iterator[None]:
    """Within the block, an op whose output size depends on values raises on fake tensors, as
    in plain PyTorch (NOTE [ Sizes that depend on values ])."""
    token = _exact_only.set(True)
    try:
        yield
    finally:
        _exact_only.reset(token)


def _worst_case_shape(func: Any, args: Any, kwargs: Any) -> tuple[Any, tuple[int, ...],
                                                                   torch.dtype] | None:
    """(the tensor whose device it takes, the worst-case shape, the dtype) of an op whose output
    size depends on values; None for an op without a known bound."""
    name = getattr(func, "__name__", "")
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        return None
    if name in ("nonzero.default", "argwhere.default"):
        return first, (first.numel(), first.dim()), torch.int64
    if name == "masked_select.default" and len(args) > 1:
        shape = torch.broadcast_shapes(first.shape, args[1].shape)
        return first, (int(torch.Size(shape).numel()),), first.dtype
    return None


class _WorstCaseSizes(FakeTensorMode):
    """A fake mode that sizes ops whose output depends on values at their worst case (NOTE
    [ Sizes that depend on values ])."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch._subclasses.fake_tensor import DynamicOutputShapeException

        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except DynamicOutputShapeException:
            worst = None if _exact_only.get() else _worst_case_shape(func, args, kwargs or {})
            if worst is None:
                raise
        like, shape, dtype = worst
        found = _worst_case_ops.get()
        if found is not None and str(func) not in found:
            found.append(str(func))
        meta = torch.empty(shape, dtype=dtype, device="meta")
        return self.fake_tensor_converter.from_meta_and_device(self, meta, like.device)


class _EagerFakeMode(_WorstCaseSizes):
    """A fake-tensor mode under which Hugging Face transformers builds attention as eager runs
    build it.

    NOTE [ Fake tensors taken for tracing ]
    transformers takes a FakeTensor for a sign of graph tracing (``is_tracing``). Where it must
    know whether a batch packs several sequences (position ids that restart), eager reads the
    position ids and, finding one sequence per row, leaves the causal mask to the attention
    kernel's ``is_causal``; under tracing it cannot read them and materialises a packed mask,
    with which grouped-query attention also repeats its keys and values: a Llama step traced
    fake ran 4% above the real one. While this mode is active, fake position ids are taken for
    one sequence per row, as eager finds them in every batch that is not packed.

    A factory that imports transformers inside the mode finds the module patched from the first
    op after the import (the first fake trace of a Hugging Face model in a process took the
    packed path and read 147 KB high on a small Llama).

    Known limitation: a packed batch (position ids that restart within a row) builds a mask in
    eager runs that fake traces leave out.
    """

    def __enter__(self) -> _EagerFakeMode:
        self._restore: list[tuple[Any, Any]] = getattr(self, "_restore", [])
        self._restore.append((None, None))
        # transformers may be imported only inside the mode (a factory that imports it): then
        # the patch is made at the first op after the import (NOTE above).
        self._awaiting = not self._patch()
        super().__enter__()
        return self

    def _patch(self) -> bool:
        """Patch ``find_packed_sequence_indices`` if transformers' masking module is loaded;
        whether it is."""
        module = sys.modules.get("transformers.masking_utils")
        original = getattr(module, "find_packed_sequence_indices", None)
        if module is None or original is None:
            return False
        self._restore[-1] = (module, original)
        setattr(module, "find_packed_sequence_indices",  # noqa: B010
                functools.partial(_one_sequence_per_row, original))
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(self, "_awaiting", False) and self._restore:
            self._awaiting = not self._patch()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is _LAYER_NORM and _statistics_narrowed(args[0], out):
            # NOTE [ Layer norm's statistics ] The CPU kernel keeps the mean and 1/std of a
            # bfloat16 or half input in float32 (its accumulation type), which it saves for the
            # backward; the meta kernel gives them the input's dtype, half the bytes (an
            # autocast(bf16) forward traced fake read 6,144 B under real). Made as eager makes
            # them.
            output, mean, rstd = out
            widen = torch.ops.aten._to_copy.default
            return output, widen(mean, dtype=torch.float32), widen(rstd, dtype=torch.float32)
        return out

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            module, original = self._restore.pop()
            if module is not None and original is not None:
                setattr(module, "find_packed_sequence_indices", original)  # noqa: B010
            self._awaiting = False


_LAYER_NORM = torch.ops.aten.native_layer_norm.default


def _statistics_narrowed(input: Any, out: Any) -> bool:
    """Whether a fake ``native_layer_norm`` on the CPU gave its mean and 1/std a narrower dtype
    than the CPU kernel does (NOTE [ Layer norm's statistics ])."""
    return (isinstance(input, FakeTensor) and input.fake_device.type == "cpu"
            and input.dtype in (torch.bfloat16, torch.float16)
            and out[1].dtype != torch.float32)


def _one_sequence_per_row(original: Any, position_ids: Any, *args: Any, **kwargs: Any) -> Any:
    """``find_packed_sequence_indices``, answering "not packed" for fake position ids
    (NOTE [ Fake tensors taken for tracing ])."""
    if isinstance(position_ids, FakeTensor):
        return None
    return original(position_ids, *args, **kwargs)


def new_fake_mode() -> FakeTensorMode:
    # Real tensors may meet fake ones inside a step (a constant a loss function holds);
    # FakeTensorMode then treats them as fake of the same shape instead of refusing.
    _let_fake_parameters_swap()
    _copy_fake_tensors_as_real_ones_are_copied()
    return _EagerFakeMode(allow_non_fake_inputs=True)


def _let_fake_parameters_swap() -> None:
    """NOTE [ A factory's own casts on fake tensors ]
    ``module.half()``, ``.double()`` or ``.to(dtype)`` replace each parameter by
    ``torch.utils.swap_tensors`` when it is fake, and the swap refuses a tensor that a weak
    reference points to. Every fake tensor an op returns is one: the fake mode's converter
    memoises it (``FakeTensorConverter.set_tensor_memo``, a WeakValueDictionary), so a factory
    that casts its model on fake tensors failed with "Couldn't swap Linear.weight" where plain
    PyTorch trains it. The memo entry only lets the mode find the fake tensor again from the
    meta tensor it was made of, which a swap replaces anyway: it is dropped before the swap.
    Installed once, for every swap of the process; a swap of real tensors is left as it was."""
    if getattr(torch.utils.swap_tensors, "_memprop", False):
        return
    original = torch.utils.swap_tensors

    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        for tensor in (t1, t2):
            if isinstance(tensor, FakeTensor):
                _forget(tensor)
        original(t1, t2)

    def _forget(tensor: FakeTensor) -> None:
        # The memo's own dict of references, so that none is kept alive by looking it up.
        entries: dict[Any, Any] = vars(tensor.fake_mode.fake_tensor_converter.tensor_memo)["data"]
        keys = [getattr(ref, "key", None) for ref in weakref.getweakrefs(tensor)]
        for key in keys:  # the references themselves are gone with the list: none left alive
            if key is not None and key in entries:
                entry = entries[key]
                if entry() is tensor:
                    del entries[key]
                del entry

    swap_tensors._memprop = True  # type: ignore[attr-defined]
    torch.utils.swap_tensors = swap_tensors


def _copy_fake_tensors_as_real_ones_are_copied() -> None:
    """NOTE [ Deep copies of fake tensors ]
    ``copy.deepcopy`` of a fake tensor (``nn.TransformerEncoder`` deep-copies its layer for
    every layer after the first) takes ``Tensor.__deepcopy__``'s storage path: a storage copied,
    then set into an empty tensor. The copy's views (``weight.t()`` in every linear layer) then
    report another storage than the copy itself, so the ledger booked each as a new one, saved
    for backward: 16 phantom storages, 2 MiB, on a 4-layer encoder that real tensors do not
    have. A real parameter is copied by ``clone``; fake ones are copied the same way here.
    Installed once, for every fake tensor of the process."""
    if getattr(FakeTensor.__deepcopy__, "_memprop", False):
        return

    def __deepcopy__(self: FakeTensor, memo: dict[int, Any]) -> torch.Tensor:
        if id(self) in memo:
            return memo[id(self)]  # type: ignore[no-any-return]
        with torch.no_grad():
            copied = self.clone(memory_format=torch.preserve_format)
        if isinstance(self, nn.Parameter):
            copied = nn.Parameter(copied, self.requires_grad)
        elif self.requires_grad:
            copied.requires_grad_(True)
        memo[id(self)] = copied
        return copied

    __deepcopy__._memprop = True  # type: ignore[attr-defined]
    FakeTensor.__deepcopy__ = __deepcopy__  # type: ignore[method-assign,assignment]


def fake_mode_of(workload: Workload) -> FakeTensorMode | None:
    for tensor in (*workload.model.parameters(), *workload.input_tensors):
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    return None


def to_fake_workload(workload: Workload, mode: FakeTensorMode) -> Workload:
    """A fake mirror of a real workload: same structure, fake parameters, buffers and inputs.

    The optimizer is rebuilt with the same class and parameter groups, and its state, if it
    has any (a workload in mid-training), is mirrored too, so the mirror starts where the
    real workload stands. Gradients are not mirrored: every traced step starts from the loop's
    ``zero_grad`` (``memprop.loop``).
    """
    model = workload.model
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(
            mode.from_tensor(parameter.detach()), requires_grad=parameter.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = mode.from_tensor(buffer)
    fake_model = copy.deepcopy(model, memo)
    optimizer = None
    if workload.optimizer is not None:
        groups = []
        for group in workload.optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": [memo[id(p)] for p in group["params"]]})
        optimizer = type(workload.optimizer)(groups)  # type: ignore[call-arg]
        for original, state in workload.optimizer.state.items():
            optimizer.state[memo[id(original)]] = {
                key: _fake_state(value, mode) for key, value in state.items()
            }
    return Workload(
        model=fake_model,
        inputs=tuple(mode.from_tensor(t) for t in workload.inputs),
        keywords={k: mode.from_tensor(t) for k, t in workload.keywords.items()},
        targets=None if workload.targets is None else mode.from_tensor(workload.targets),
        loss_fn=workload.loss_fn,
        optimizer=optimizer,
        name=workload.name,
        batch_size=workload.batch_size,
        depth=workload.depth,
        config=dict(workload.config),
        set_to_none=workload.set_to_none,
        chunk_head=workload.chunk_head,
        blocks=workload.blocks,
    )


def _fake_state(value: Any, mode: FakeTensorMode) -> Any:
    """An optimizer's state entry on fake tensors. A scalar (Adam's step counter) stays a
    constant that fake tensors can read, since the optimizer reads it (``step.item()``)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0:
        number = value.item()  # read outside the mode: inside it, the tensor would be fake
        with mode:
            return torch.tensor(number, dtype=value.dtype, device=value.device)
    return mode.from_tensor(value)


def device_of(workload: Workload) -> torch.device:
    for tensor in (*workload.model.parameters(), *workload.input_tensors):
        return tensor.device
    return torch.device("cpu")
