"""The storage ledger: the birth and death of every tensor storage during a step.

NOTE [ How the ledger sees memory ]
A ``TorchDispatchMode`` sees every aten op after autograd has decomposed it, forward and
backward alike (the autograd engine runs the backward ops on the thread that called backward on
the CPU, and carries the mode to its device threads on CUDA). After each op, every output whose
storage is new is *born* at that op's clock tick. A weak reference to the storage's Python object
(PyTorch keeps one object per live storage) calls back when the storage dies: that is its
*death*, stamped with the clock of the last op that ran. Views and in-place results share a
storage that is already known and are skipped, so each storage is counted once however many
tensors view it.

Time is the allocation clock: it ticks at every op that creates at least one new storage (views,
in-place ops and metadata queries allocate nothing and do not tick, which also keeps the clocks
of real and fake traces equal). ``born == t`` means the storage came out of the ``t``-th
allocating op; ``freed == t`` means it died after that op and before the next allocating one.
A storage is therefore live at tick ``t`` when ``born <= t <= freed``; the peak is the largest
live total over all ticks, measured just after each op's outputs exist, as
``torch.cuda.max_memory_allocated`` would see them.

The hot path only appends records; categories, totals and peaks are computed afterwards from the
records, so a storage's category can be decided late (a temporary that autograd makes a
parameter's ``.grad`` is a gradient from its birth).

NOTE [ Sharded tensors and storages resized in place ]
Two kinds of memory do not show through a plain tensor's storage, and FSDP2 uses both:

- A DTensor is a wrapper: its own storage is a placeholder of the global size, a new object at
  each ``untyped_storage()`` call. What a rank holds is its local shard, so every tensor the
  ledger looks at (op outputs, registered and saved tensors) is first unwrapped to its
  ``_local_tensor``; in-place ops on DTensors (an optimizer's ``mul_``, ``lerp_``) then land on
  storages already known, as they do on plain tensors.
- ``UntypedStorage.resize_`` reallocates a storage without an aten op (FSDP2 frees the gathered
  parameters with ``resize_(0)`` after each use and allocates them again with ``resize_(n)``).
  While a ledger is active, ``torch.UntypedStorage.resize_`` is wrapped: a resize is the death of
  the storage's record and, when the new size is not zero, the birth of a new one at a new tick,
  as an op that allocated would be. The wrapper is installed by the first ledger entered and
  removed when the last one exits (ledgers nest; each active ledger is told).

NOTE [ The generators' state a checkpoint keeps ]
``torch.utils.checkpoint`` (``preserve_rng_state``) keeps ``torch.get_rng_state()``, a copy of
the CPU generator's state (5,056 bytes), for each checkpoint around random ops, and one more
while it re-runs one (``torch.random.fork_rng``). The copy is made below the dispatcher, so
while a ledger is active ``torch.get_rng_state`` is wrapped like ``resize_`` above: its tensor
is born at a new tick and dies when checkpoint lets it go. It counts only on a CPU step: on a
GPU, where the ledger has seen CUDA storages, it is host memory, outside the device's peak.

Known limitations:
- Scratch buffers that a kernel allocates and frees inside one op are invisible (as they are to
  every dispatch-level tracker); cuBLAS and cuDNN workspaces are the main case on a GPU. So are
  the temporaries of a DTensor op's own local computation (the ledger sees the DTensor op).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Iterable
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from memprop.calibration.rates import Probe

__all__ = ["Category", "OpEntry", "StorageLedger", "StorageRecord", "active_ledger",
           "rounded_bytes"]


class Category(str, Enum):
    """What a storage is for; the rows of the memory breakdown."""

    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    INPUTS = "inputs"
    SAVED_ACTIVATIONS = "saved_activations"
    TEMPORARIES = "temporaries"


_PREEXISTING = (Category.PARAMETERS, Category.BUFFERS, Category.INPUTS)

# CUDA's caching allocator hands out blocks in multiples of 512 bytes
# (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp); torch.cuda.max_memory_allocated counts
# the rounded size, so the ledger does too on a CUDA device.
CUDA_BLOCK_BYTES = 512


# prim::device and friends: fake tensors answer them through the dispatcher, real ones do not.
# They allocate nothing and are not steps of the computation.
_METADATA_QUERIES = frozenset(
    op.default for op in (torch.ops.prim.device, torch.ops.prim.layout)
)
_IDENTITY_WHEN_NOT_TRAINING = frozenset(
    (torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
     torch.ops.aten.alpha_dropout.default, torch.ops.aten.feature_alpha_dropout.default)
)


_PLAIN = "plain"
_ALIAS = "alias"
_IDENTITY = "identity"
_RESIZE = "resize"
_COMPOSITE = "composite"
# aten ops that may reallocate their tensor's storage in place (a known storage, a new size).
_RESIZES = frozenset((torch.ops.aten.resize_.default, torch.ops.aten.resize_as_.default))


def _composite_only(name: str) -> bool:
    """Whether the op's only implementation is its composite decomposition (cross_entropy,
    linear, matmul): what the real op runs is then the decomposition, op by op. An op with a
    kernel of its own (silu_backward runs one CPU kernel; its composite form, for other
    backends, makes temporaries the kernel does not) is not decomposed."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(name, "CompositeImplicitAutograd") and not any(
        has(name, key) for key in ("CPU", "CUDA", "Meta"))


def _classify(func: Any) -> Any:
    """How the hot path treats an op: a metadata query (it cannot allocate), dropout (identity
    when not training), a resize (it may reallocate a known storage), an op with a FLOP formula
    (``count(args, kwargs, out)``) or a plain op.
    Views are plain: a view of a tensor made outside the step (``lift_fresh`` of a constant) is
    the first sight of its storage."""
    if func in _METADATA_QUERIES:
        return _ALIAS
    if func in _IDENTITY_WHEN_NOT_TRAINING:
        return _IDENTITY
    if func in _RESIZES:
        return _RESIZE
    if _composite_only(func.name()):
        return _COMPOSITE
    if func in _MATMULS:
        return _MATMULS[func]
    formula = flop_registry.get(func.overloadpacket)
    return _PLAIN if formula is None else functools.partial(_count_flops, formula)


def _mm_flops(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    m, k = args[0].shape
    return int(2 * m * k * args[1].shape[1])


def _addmm_flops(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    m, k = args[1].shape
    return int(2 * m * k * args[2].shape[1])


def _bmm_flops(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    b, m, k = args[0].shape
    return int(2 * b * m * k * args[1].shape[2])


# The matmuls of every linear layer, counted as torch.utils.flop_counter counts them (2·m·k·n,
# the bias of addmm not counted) without its generic wrappers: they run at every linear layer's
# forward and backward, where the wrappers' pytree walks cost more than the matmul on small
# shapes. The tests hold the two counts equal.
_MATMULS: dict[Any, Any] = {
    torch.ops.aten.mm.default: _mm_flops,
    torch.ops.aten.addmm.default: _addmm_flops,
    torch.ops.aten.bmm.default: _bmm_flops,
}


def _shape(value: Any) -> Any:
    return value.shape if isinstance(value, torch.Tensor) else value


def _count_flops(formula: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """PyTorch's FLOP formula for one op. The registered formulas convert every argument to a
    shape with a pytree walk; the raw formula under them takes shapes directly, and one level
    of conversion is all the matmul and convolution signatures need."""
    raw = getattr(formula, "__wrapped__", None)
    if raw is None or any(isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
                          for a in args):
        return int(formula(*args, **kwargs, out_val=out))
    out_shape = tuple(_shape(o) for o in out) if isinstance(out, (tuple, list)) else _shape(out)
    return int(raw(*(_shape(a) for a in args), out_shape=out_shape,
                   **{k: _shape(v) for k, v in kwargs.items()}))


def _moved_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (one level of lists): what an op reads or writes."""
    if isinstance(value, torch.Tensor):
        return int(value.numel()) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_moved_bytes(v) for v in value if isinstance(v, (torch.Tensor, list, tuple)))
    return 0


_INDEXED_READ = torch.ops.aten.index.Tensor
_INDEXED_WRITES = frozenset((torch.ops.aten.index_put_.default,
                             torch.ops.aten._index_put_impl_.default))
_NO_COPY = torch.ops.aten._unsafe_view.default


def _op_moved_bytes(func: Any, args: tuple[Any, ...], out: Any) -> int:
    """What an op reads and writes: its tensors, but for ops that touch a few elements of a
    large one (``x[rows, labels]``, read or written in place: the elements selected and their
    indices) and ``_unsafe_view`` (a view that is not marked as one: nothing)."""
    if func is _NO_COPY:
        return 0
    if func is _INDEXED_READ:
        return 2 * _moved_bytes(out) + _moved_bytes(args[1])
    if func in _INDEXED_WRITES:
        return 2 * _moved_bytes(args[2]) + _moved_bytes(args[1])
    return _moved_bytes(args) + _moved_bytes(out)


def _probe(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
           ) -> tuple[Probe | None, int]:
    """A pointwise op's call and the elements of its (first) output; ``(None, 0)`` when the
    call cannot be described (an argument that is a list, a device, a dtype...): the roofline
    then prices it by its bytes alone."""
    first = out if isinstance(out, torch.Tensor) else (
        out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor)
        else None)
    if first is None:
        return None, 0
    elements = int(first.numel())

    def described(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", str(value.dtype).removeprefix("torch."),
                    int(value.numel()) == elements)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError

    try:
        positional = tuple(described(a) for a in args)
        keyword = tuple((k, described(v)) for k, v in sorted(kwargs.items()))
    except TypeError:
        return None, 0
    return (str(func), positional, keyword), elements


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an in-place or out= op writes, by its schema."""
    found = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if isinstance(value, torch.Tensor):
            found.append(value)
    return found


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``tensor``'s memory on this rank: a DTensor's local
    shard (NOTE [ Sharded tensors and storages resized in place ]), else the tensor itself."""
    return tensor._local_tensor if _is_sharded(tensor.__class__) else tensor  # type: ignore[attr-defined]


_SHARDED: dict[type, bool] = {}
"""Per tensor class, whether it is a DTensor: asked once per class, not at every op (a failed
attribute lookup on every fake tensor the hot path sees would cost more)."""


def _is_sharded(cls: type) -> bool:
    found = _SHARDED.get(cls)
    if found is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a build of torch without torch.distributed
            found = False
        else:
            found = issubclass(cls, DTensor)
        _SHARDED[cls] = found
    return found


# The ledgers entered and not yet exited, innermost last: each is told of every storage resize
# (NOTE [ Sharded tensors and storages resized in place ]).
_ACTIVE: list[StorageLedger] = []
_ORIGINAL_RESIZE = torch.UntypedStorage.resize_


def active_ledger() -> StorageLedger | None:
    """The innermost ledger entered and not yet exited (None outside a traced step)."""
    return _ACTIVE[-1] if _ACTIVE else None


def _resize_seen(storage: torch.UntypedStorage, size: int) -> Any:
    before = storage.nbytes()
    result = _ORIGINAL_RESIZE(storage, size)
    if storage.nbytes() != before:
        for ledger in list(_ACTIVE):
            ledger._resized(storage)
    return result


_ORIGINAL_GET_RNG_STATE = torch.get_rng_state


def _rng_state_seen() -> torch.Tensor:
    state = _ORIGINAL_GET_RNG_STATE()
    for ledger in list(_ACTIVE):
        if not ledger._seen_cuda:
            ledger._resized(state.untyped_storage(), "get_rng_state")
    return state


def _training_flag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return bool(kwargs.get("train", args[2] if len(args) > 2 else True))


class StorageRecord:
    """One storage's life. Mutable only while the ledger is recording."""

    __slots__ = (
        "born",
        "bytes",
        "category",
        "dtype",
        "freed",
        "index",
        "module",
        "op",
        "phase",
        "saved",
        "saved_in_phase",
        "shape",
    )

    def __init__(
        self,
        index: int,
        nbytes: int,
        born: int,
        category: Category,
        op: Any,
        module: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        phase: str,
    ) -> None:
        self.index = index
        self.bytes = nbytes
        self.born = born
        self.freed: int | None = None
        self.category = category
        self.op = op
        self.module = module
        self.shape = shape
        self.dtype = dtype
        self.phase = phase
        self.saved = False
        self.saved_in_phase: str | None = None

    @property
    def op_name(self) -> str:
        return op_name(self.op)

    def live_at(self, tick: int) -> bool:
        return self.born <= tick and (self.freed is None or tick <= self.freed)


def op_name(op: Any) -> str:
    """``relu`` for ``aten.relu.default``; labels such as ``(existing)`` stay as they are."""
    if isinstance(op, str):
        return op
    return str(op.overloadpacket.__name__) if hasattr(op, "overloadpacket") else str(op)


class OpEntry(NamedTuple):
    """One op of a step whose ops are logged (``StorageLedger(log_ops=True)``)."""

    func: Any
    tick: int
    """The clock after the op: the tick of its outputs when it made new ones."""
    born: tuple[StorageRecord, ...]
    """The storages it made."""
    flops: int
    moved: int
    """Bytes of the tensors it read and wrote (0 for a view, which moves nothing)."""
    written: tuple[int, ...] = ()
    """The records (by index) of the storages it wrote in place."""
    probe: Probe | None = None
    """For a pointwise op, its call with tensors replaced by their dtype (how
    ``memprop.calibration.rates`` times such an op on this machine); None for other ops."""
    elements: int = 0
    """Elements of a pointwise op's (first) output (0 for other ops)."""


class _StorageRef(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("key", "record")
    key: int
    record: StorageRecord


def rounded_bytes(nbytes: int, device: torch.device) -> int:
    """What the device's allocator gives ``nbytes``: CUDA's caching allocator rounds up to
    whole blocks; the CPU's gives what is asked."""
    if device.type == "cuda" and nbytes > 0:
        return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return nbytes


class StorageLedger(TorchDispatchMode):
    """Records every storage born and freed while it is the active dispatch mode.

    The driver (``memprop.trace.step``) sets ``phase`` and ``module`` as the step goes; the
    ledger stamps them on each record. ``flops`` and ``tick_flops`` count floating-point
    operations with PyTorch's own formulas (``torch.utils.flop_counter``).
    """

    def __init__(self, *, log_ops: bool = False) -> None:
        super().__init__()
        self.clock = 0
        self.records: list[StorageRecord] = []
        self._live: dict[int, _StorageRef] = {}
        self.phase = "setup"
        self.module = ""
        self.flops = 0
        # One (op, module, phase) per tick; tick 0 is "before the first op".
        self.ticks: list[tuple[Any, str, str]] = [("(start)", "", "setup")]
        self.tick_flops: dict[int, int] = {}
        """FLOPs of the ops run at each tick (an op that allocates nothing counts at the tick of
        the last op that did): sums over a region's ticks are the region's FLOPs."""
        self.ops: list[OpEntry] | None = [] if log_ops else None
        """With ``log_ops``: every op in order, its FLOPs and the bytes it read and wrote (to
        price memory-bound work, and to choose which op outputs a block keeps)."""
        self._on_free = self._make_free_callback()
        self._kinds: dict[Any, Any] = {}
        self._pointwise: dict[Any, bool] = {}
        """Per op, whether it is pointwise (logged steps only): looked up once."""
        self._curves_cache: tuple[tuple[int, int], tuple[list[int], list[int]]] | None = None
        self._seen_cuda = False
        """Whether a CUDA tensor (real or fake) was seen: the step is a GPU's, and host memory (the
        generators' states, NOTE [ The generators' state a checkpoint keeps ]) is not in its
        peak."""

    @classmethod
    def from_records(cls, records: list[StorageRecord], ticks: list[tuple[Any, str, str]],
                     tick_flops: dict[int, int], *, seen_cuda: bool) -> StorageLedger:
        """A closed ledger of a step that was not run through it: its records and ticks built
        elsewhere (``memprop.trace.repeated``: a deep model's step from a few blocks)."""
        ledger = cls()
        ledger.records = records
        ledger.ticks = ticks
        ledger.clock = len(ticks) - 1
        ledger.tick_flops = tick_flops
        ledger.flops = sum(tick_flops.values())
        ledger._seen_cuda = seen_cuda
        return ledger

    def _make_free_callback(self) -> Any:
        # A plain function holding the ledger weakly: the callback must not keep the ledger
        # alive, and it runs inside whatever op happened to drop the last reference.
        ledger_ref = weakref.ref(self)

        def on_free(ref: _StorageRef) -> None:
            ledger = ledger_ref()
            if ledger is None:
                return
            ref.record.freed = ledger.clock
            ledger._live.pop(ref.key, None)

        return on_free

    # -- registration of what exists before the step -------------------------------------

    def register(self, tensors: Iterable[torch.Tensor], category: Category, label: str) -> None:
        """Adopt storages that exist before the step (parameters, inputs...), born at tick 0."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._adopt(tensor, category, label)

    def _adopt(self, tensor: torch.Tensor, category: Category, label: str) -> StorageRecord:
        """The record of a storage that existed before the step: born at tick 0."""
        tensor = _local(tensor)
        storage = tensor.untyped_storage()
        found = self._lookup(storage)
        if found is not None:
            return found
        self._seen_cuda = self._seen_cuda or tensor.is_cuda
        record = StorageRecord(
            len(self.records),
            rounded_bytes(storage.nbytes(), tensor.device),
            0,
            category,
            "(existing)",
            label,
            tuple(tensor.shape),
            tensor.dtype,
            self.phase,
        )
        self._track(storage, record)
        return record

    def _lookup(self, storage: torch.UntypedStorage) -> StorageRecord | None:
        ref = self._live.get(id(storage))
        return ref.record if ref is not None else None

    def _track(self, storage: torch.UntypedStorage, record: StorageRecord) -> None:
        ref = _StorageRef(storage, self._on_free)
        ref.key = id(storage)
        ref.record = record
        self._live[ref.key] = ref
        self.records.append(record)

    def record_of(self, tensor: torch.Tensor) -> StorageRecord | None:
        """The record of a tensor's storage, if the ledger knows it and it is alive."""
        return self._lookup(_local(tensor).untyped_storage())

    def mark_saved(self, tensor: torch.Tensor) -> StorageRecord:
        """Called by the saved-tensors pack hook for every tensor autograd keeps for backward."""
        tensor = _local(tensor)
        storage = tensor.untyped_storage()
        record = self._lookup(storage)
        if record is None:
            # Existed before the step without being registered: a constant the model holds
            # outside its parameters and buffers. It is read by the step, so it is an input.
            record = self._adopt(tensor, Category.INPUTS, self.module)
        if not record.saved:
            record.saved = True
            record.saved_in_phase = self.phase
            if record.category is Category.TEMPORARIES:
                record.category = Category.SAVED_ACTIVATIONS
        return record

    # -- the hot path ---------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # NOTE [ The hot path ] This runs at every aten op of the step, forward and backward:
        # one dict lookup classifies the op, and a storage already on the ledger (a view, an
        # in-place result) costs one more.
        kind: Any = self._kinds.get(func)
        if kind is None:
            kind = self._kinds[func] = _classify(func)
        if kwargs is None:
            kwargs = {}
        if kind is _IDENTITY and not _training_flag(args, kwargs):
            # NOTE [ Fake dropout ] Eager dropout in eval mode hands back its input; fake
            # tensors make a fresh output instead. Answer as eager does, so fake equals real.
            return args[0]
        if kind is _COMPOSITE:
            # NOTE [ Composite ops under inference_mode ] Autograd decomposes a composite op
            # (cross_entropy, linear, matmul, scaled_dot_product_attention) before a dispatch
            # mode sees it, except under torch.inference_mode, which skips autograd: the mode
            # is then handed the whole op, and what it allocates inside (cross_entropy's
            # log_softmax) is never seen. Decompose it here, as autograd would.
            # The mode is off while its own hook runs: entered again for the ops inside.
            # Inline, not a helper: an error in the user's model then passes through this
            # hook alone, which NOTE [ Blame ] (memprop.blame) counts as a relay.
            TorchDispatchMode.__enter__(self)
            try:
                out = func.decompose(*args, **kwargs)
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if kind is _ALIAS:
            return out
        live = self._live
        born = 0
        if isinstance(out, torch.Tensor):
            local = out if out.__class__ is torch.Tensor else _local(out)
            storage = local.untyped_storage()
            if id(storage) not in live:
                self.clock += 1
                self.ticks.append((func, self.module, self.phase))
                self._born(local, storage, func)
                born = 1
            elif kind is _RESIZE:  # classified once per op, like the rest
                self._resized(storage, func)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    item = item if item.__class__ is torch.Tensor else _local(item)
                    storage = item.untyped_storage()
                    if id(storage) not in live:
                        if not born:
                            self.clock += 1
                            self.ticks.append((func, self.module, self.phase))
                        self._born(item, storage, func)
                        born += 1
        count = 0
        if kind.__class__ is not str:  # an op with a FLOP formula (not _PLAIN, _IDENTITY...)
            count = kind(args, kwargs, out)
            self.flops += count
            self.tick_flops[self.clock] = self.tick_flops.get(self.clock, 0) + count
        if self.ops is not None:
            self._log(func, args, kwargs, out, born, count)
        return out

    def _log(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
             born: int, flops: int) -> None:
        """The op's entry in the op log (``log_ops``: planning traces, not the hot path of a
        profile): what it made, read and wrote, and its call when it is pointwise."""
        moved = 0 if func.is_view else _op_moved_bytes(func, args, out)
        written: tuple[int, ...] = ()
        if func._schema.is_mutable:
            written = tuple(r.index for r in map(self.record_of, _written(func, args, kwargs))
                            if r is not None)
        pointwise = self._pointwise.get(func)
        if pointwise is None:
            pointwise = self._pointwise[func] = (torch.Tag.pointwise in func.tags
                                                 and not func.is_view)
        probe, elements = _probe(func, args, kwargs, out) if pointwise else (None, 0)
        assert self.ops is not None
        self.ops.append(OpEntry(func, self.clock, tuple(self.records[-born:]) if born else (),
                                flops, moved, written, probe, elements))

    def __enter__(self) -> StorageLedger:
        if not _ACTIVE:
            torch.UntypedStorage.resize_ = _resize_seen  # type: ignore[method-assign,assignment]
            torch.get_rng_state = _rng_state_seen
        _ACTIVE.append(self)
        try:
            super().__enter__()
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if not _ACTIVE:
            torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE  # type: ignore[method-assign]
            torch.get_rng_state = _ORIGINAL_GET_RNG_STATE

    def _resized(self, storage: torch.UntypedStorage, func: Any = "resize_") -> None:
        """A storage reallocated in place: its record dies, and a new one of its new size is
        born at a new tick when the size is not zero (NOTE [ Sharded tensors and storages
        resized in place ]). Growing a live storage allocates the new block before the old one
        is freed, so the two overlap at that tick."""
        ref = self._live.pop(id(storage), None)
        old = None if ref is None else ref.record
        nbytes = storage.nbytes()
        if nbytes == 0:
            if old is not None:
                old.freed = self.clock
            return
        record = self._tick_record(nbytes, func, storage.device, old)
        if old is not None:
            old.freed = self.clock
        self._track(storage, record)

    def transient(self, nbytes: int, func: Any, device: torch.device) -> StorageRecord:
        """A block that something below the dispatcher allocates and frees within one op (a
        communication backend's copy of its input): born and freed at a tick of its own."""
        record = self._tick_record(nbytes, func, device)
        record.freed = self.clock
        self.records.append(record)
        return record

    def _tick_record(self, nbytes: int, func: Any, device: torch.device,
                     like: StorageRecord | None = None) -> StorageRecord:
        """A record born at a tick of its own for memory no op output shows (a resize, a
        backend's copy): a block of bytes, or the shape, dtype and category of ``like``, the
        record it replaces."""
        self.clock += 1
        self.ticks.append((func, self.module, self.phase))
        return StorageRecord(
            len(self.records), rounded_bytes(nbytes, device), self.clock,
            Category.TEMPORARIES if like is None else like.category, func, self.module,
            (nbytes,) if like is None else like.shape,
            torch.uint8 if like is None else like.dtype, self.phase)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps subclasses' __torch_dispatch__ in torch._disable_dynamo, which
        # costs a few microseconds per op. The ledger never runs under torch.compile's tracing.
        return False

    def _born(self, tensor: torch.Tensor, storage: torch.UntypedStorage, func: Any) -> None:
        nbytes = storage.nbytes()
        if tensor.is_cuda:
            nbytes = rounded_bytes(nbytes, tensor.device)
            self._seen_cuda = True
        record = StorageRecord(
            len(self.records),
            nbytes,
            self.clock,
            Category.TEMPORARIES,
            func,
            self.module,
            tensor.shape,
            tensor.dtype,
            self.phase,
        )
        self._track(storage, record)

    # -- after the step -------------------------------------------------------------------

    def close(self) -> None:
        """Stop following deaths: what dies after the step (gradients that the loop's next
        ``zero_grad`` frees) is not the step's. The records keep what they saw."""
        self._live.clear()

    def reclassify(self, tensors: Iterable[torch.Tensor], category: Category) -> None:
        """Give storages their final category (gradients, optimizer state) once it is known."""
        for tensor in tensors:
            record = self.record_of(tensor)
            if record is not None and record.category not in _PREEXISTING:
                record.category = category

    def live_after_bytes(self) -> list[int]:
        """Live bytes at every tick once the storages that died after that op are gone."""
        return self._live_curves()[1]

    def _live_curves(self) -> tuple[list[int], list[int]]:
        # Called several times once the step is over; the records no longer change by then.
        key = (self.clock, len(self.records))
        if self._curves_cache is not None and self._curves_cache[0] == key:
            return self._curves_cache[1]
        curves = self._compute_live_curves()
        self._curves_cache = (key, curves)
        return curves

    def _compute_live_curves(self) -> tuple[list[int], list[int]]:
        births = [0] * (self.clock + 2)
        deaths = [0] * (self.clock + 2)
        for record in self.records:
            births[record.born] += record.bytes
            if record.freed is not None:
                deaths[record.freed] += record.bytes
        live, after, total = [], [], 0
        for tick in range(self.clock + 1):
            total += births[tick]
            live.append(total)
            total -= deaths[tick]
            after.append(total)
        return live, after

    def category_curves(self) -> dict[Category, list[int]]:
        """Live bytes per category at every tick (the stacked chart of the step)."""
        deltas = {category: [0] * (self.clock + 2) for category in Category}
        for record in self.records:
            delta = deltas[record.category]
            delta[record.born] += record.bytes
            if record.freed is not None:
                delta[record.freed + 1] -= record.bytes
        return {category: list(itertools.accumulate(delta[: self.clock + 1]))
                for category, delta in deltas.items()}

    def peak(self) -> tuple[int, int]:
        """(peak bytes, tick of the peak): the largest live total just after an op's outputs."""
        live = self._live_curves()[0]
        best = max(range(len(live)), key=live.__getitem__)
        return live[best], best
