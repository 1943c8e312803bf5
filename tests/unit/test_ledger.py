"""The ledger against oracles: hand counts, saved_tensors_hooks, MemTracker, and fake tensors."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import memprop
from memprop.loop import compute_loss
from memprop.trace.fake import new_fake_mode
from memprop.workload import SeedConfig, Workload, seed_workload
from tests.zoo import ZOO


def _hooks_saved_bytes(workload: Workload) -> int:
    """Oracle: storages that autograd packs during forward, deduplicated by storage, parameters,
    buffers and inputs excluded. Written without any of memprop's tracing code."""
    model = workload.model
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    excluded |= {t.untyped_storage().data_ptr() for t in workload.inputs}
    if workload.targets is not None:
        excluded.add(workload.targets.untyped_storage().data_ptr())
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in excluded:
            seen[pointer] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(*workload.inputs)
        loss, _ = compute_loss(workload, output)
    # Everything packed is still alive here (the graph holds it), so pointers are unique.
    total = sum(t.untyped_storage().nbytes() for t in seen.values())
    del output, loss
    return total


def _memtracker_peak(workload: Workload, step: int = 3) -> int:
    """Oracle: PyTorch's MemTracker around step ``step`` of a plain training loop
    (``zero_grad``, forward, loss, backward, ``optimizer.step()``), the earlier steps run
    untraced. Step 1 is the loop's first step; from step 2 on, the optimizer's state exists."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def zero_grad() -> None:
        if workload.optimizer is not None:
            workload.optimizer.zero_grad(set_to_none=workload.set_to_none)
        else:
            workload.model.zero_grad(set_to_none=workload.set_to_none)

    def one_step() -> None:
        output = workload.model(*workload.inputs)
        loss, _ = compute_loss(workload, output)
        loss.backward()
        if workload.optimizer is not None:
            workload.optimizer.step()
        del output, loss

    for _ in range(step - 1):
        zero_grad()
        one_step()
    zero_grad()
    tracker = MemTracker()
    extra = [workload.targets] if workload.targets is not None else []
    owned = [workload.optimizer] if workload.optimizer is not None else []
    tracker.track_external(workload.model, *owned, *workload.inputs, *extra)
    with tracker:
        one_step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _memtracker_inference_peak(workload: Workload) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(workload.model, *workload.inputs)
    workload.model.eval()
    with tracker, torch.inference_mode():
        output = workload.model(*workload.inputs)
        del output
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.parametrize(("activation", "per_layer"), [("relu", 1), ("tanh", 1), ("gelu", 2)])
@pytest.mark.parametrize(("batch", "hidden", "depth"), [(1, 3, 1), (8, 16, 2), (32, 100, 5)])
def test_saved_activations_equal_a_hand_count(
    activation: str, per_layer: int, batch: int, hidden: int, depth: int
) -> None:
    classes = 4
    workload = seed_workload(SeedConfig(input_dim=7, hidden=hidden, classes=classes,
                                        depth=depth, batch=batch, activation=activation))
    result = memprop.profile(workload)
    # Per hidden layer: φ's output (which the next layer's matmul saves too: one storage), and
    # for gelu its input z as well; then log_softmax's output and nll_loss's total_weight scalar.
    expected = 4 * (per_layer * depth * batch * hidden + batch * classes + 1)
    assert result.saved_activations_bytes == expected
    hidden_rows = [t for t in result.saved_tensors if t.shape == (batch, hidden)]
    assert len(hidden_rows) == per_layer * depth
    assert {t.module for t in hidden_rows} == {f"layers.{i}" for i in range(depth)} | (
        {f"layers.{i}.linear" for i in range(depth)} if per_layer == 2 else set()
    )
    assert all(t.freed is not None and t.born < t.freed for t in result.saved_tensors)


class _ViewsAndInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)            # (4, 12): not saved by anything below
        v = h.view(4, 3, 4)           # a view: same storage
        v.mul_(2.0)                   # in place on the view: mul by a constant saves nothing
        s = torch.sigmoid(v)          # saves its output: 4*12 floats
        return s.transpose(1, 2).sum()  # a view, then a sum that saves nothing


def test_views_and_in_place_ops_are_counted_once_by_hand() -> None:
    torch.manual_seed(0)
    model = _ViewsAndInPlace()
    result = memprop.profile(model, torch.randn(4, 6))
    assert result.saved_activations_bytes == 4 * 12 * 4
    assert [(t.op, t.shape) for t in result.saved_tensors] == [("sigmoid", (4, 3, 4))]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_saved_activations_equal_saved_tensors_hooks(name: str) -> None:
    assert memprop.profile(ZOO[name]()).saved_activations_bytes == _hooks_saved_bytes(ZOO[name]())


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"frozen"}))
def test_training_peak_is_the_third_steps_and_first_step_peak_the_firsts(name: str) -> None:
    # MemTracker registers a hook on every parameter and so refuses frozen ones: "frozen" is
    # covered by the hooks and fake oracles instead.
    result = memprop.profile(ZOO[name]())
    assert result.training_peak_bytes == _memtracker_peak(ZOO[name](), step=3)
    assert result.first_step_peak_bytes == _memtracker_peak(ZOO[name](), step=1)


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"frozen"}))
def test_inference_peak_equals_memtracker(name: str) -> None:
    ours = memprop.profile(ZOO[name]()).inference_peak_bytes
    assert ours == _memtracker_inference_peak(ZOO[name]())


def _records(result: memprop.Profile) -> list[tuple[object, ...]]:
    return [(op, module) for op, module in zip(result.timeline.ops, result.timeline.modules,
                                               strict=True)]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_fake_equals_real_to_the_byte(name: str) -> None:
    factory: Callable[[], Workload] = ZOO[name]
    real = memprop.profile(factory())
    with new_fake_mode():
        fake_workload = factory()
    fake = memprop.profile(fake_workload)
    assert fake.workload["mode"] == "fake" and real.workload["mode"] == "real"
    assert fake.memory == real.memory
    assert fake.peak_breakdown == real.peak_breakdown
    assert [(t.op, t.module, t.shape, t.bytes, t.born) for t in fake.saved_tensors] == [
        (t.op, t.module, t.shape, t.bytes, t.born) for t in real.saved_tensors
    ]
    assert [(s.input_bytes, s.saved_bytes, s.output_bytes, s.flops) for s in fake.stages] == [
        (s.input_bytes, s.saved_bytes, s.output_bytes, s.flops) for s in real.stages
    ]
    assert fake.measured is None
    if name != "tied":
        assert _records(fake) == _records(real)
        assert fake.timeline.curves == real.timeline.curves
    else:
        # NOTE [ In-place ops on views ] The backward of an in-place op on a view (CopySlices)
        # takes another path for fake tensors (they replay views instead of as_strided): eager
        # allocates one more temporary, the size of the base, which fake tensors skip. It is
        # not at the peak here; this pins exactly what differs.
        extra = [op for op in real.timeline.ops if op not in fake.timeline.ops]
        assert extra == ["new_zeros"]


def test_fake_flag_leaves_a_real_model_untouched() -> None:
    workload = ZOO["relu-mlp"]()
    before = [p.detach().clone() for p in workload.model.parameters()]
    fake = memprop.profile(workload.model, workload.inputs, loss_fn=workload.loss_fn,
                           targets=workload.targets, optimizer=workload.optimizer, fake=True)
    assert all(p.grad is None for p in workload.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, workload.model.parameters(), strict=True))
    real = memprop.profile(ZOO["relu-mlp"]())
    assert fake.memory == real.memory


def test_tied_weights_are_one_parameter_storage() -> None:
    result = memprop.profile(ZOO["tied"]())
    embed, mix = 50 * 16 * 4, (16 * 16 + 16) * 4
    assert result.memory.parameters_bytes == embed + mix
    assert result.memory.gradients_bytes == embed + mix


def test_frozen_parameters_get_no_gradient() -> None:
    result = memprop.profile(ZOO["frozen"]())
    trainable = (16 * 16 + 16) * 4
    assert result.memory.parameters_bytes == 2 * trainable
    assert result.memory.gradients_bytes == trainable
    assert "mean" in result.loss_note  # a tuple output without a loss function is reduced


def test_dropout_mask_is_a_saved_activation() -> None:
    result = memprop.profile(ZOO["frozen"]())
    # Eager dropout on the CPU draws a mask of the input's dtype and saves it for backward.
    assert [(t.module, t.shape) for t in result.saved_tensors if t.module == "drop"] == [
        ("drop", (8, 16))
    ]


def test_optimizer_state_is_counted() -> None:
    result = memprop.profile(ZOO["gelu-mlp"]())  # Adam: two moments per parameter
    params = result.memory.parameters_bytes
    tensors = 6  # three weights, three biases: one float32 step counter each
    assert result.memory.optimizer_state_bytes == 2 * params + 4 * tensors


def _second_order_oracle(model: nn.Module, x: torch.Tensor) -> int:
    """Storages that autograd packs while the backward itself runs with create_graph=True,
    deduplicated, the first-order saved activations (packed in forward), parameters, inputs and
    the gradients left in .grad excluded: the second-order graph, held alive by the gradients.
    Written without memprop's tracing."""
    model = copy.deepcopy(model)
    packed: dict[int, torch.Tensor] = {}
    first_order: set[int] = set()
    backward = False

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if backward:
            packed[pointer] = tensor
        else:
            first_order.add(pointer)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().mean()
        backward = True
        loss.backward(create_graph=True)
    excluded = first_order | {t.untyped_storage().data_ptr() for t in (*model.parameters(), x)}
    excluded |= {p.grad.untyped_storage().data_ptr() for p in model.parameters()
                 if p.grad is not None}
    return sum(t.untyped_storage().nbytes() for ptr, t in packed.items() if ptr not in excluded)


def test_double_backward_reports_the_second_order_graph() -> None:
    """Seed exercise 4: create_graph=True keeps a graph of the backward pass itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 1, bias=False))
    x = torch.randn(3, 5)
    first = memprop.profile(model, x)
    model.zero_grad(set_to_none=True)
    second = memprop.profile(model, x, create_graph=True)
    assert first.memory.second_order_saved_bytes == 0
    assert second.memory.second_order_saved_bytes == _second_order_oracle(model, x)
    assert second.training_peak_bytes > first.training_peak_bytes
    # The gradients themselves carry a graph: they can be differentiated again.
    weight = model[0].weight
    assert weight.grad is not None and weight.grad.requires_grad
    (weight.grad**2).sum().backward()


def test_stage_costs_of_the_seed_mlp() -> None:
    batch, hidden, depth = 16, 32, 3
    result = memprop.profile(seed_workload(SeedConfig(input_dim=8, hidden=hidden, classes=4,
                                                      depth=depth, batch=batch)))
    activation = 4 * batch * hidden
    assert [s.name for s in result.stages] == [f"layers.{i}" for i in range(depth + 1)]
    hidden_stages = result.stages[:depth]
    assert all(s.output_bytes == activation and s.saved_bytes == activation for s in hidden_stages)
    assert all(s.saves_input and s.saves_output for s in hidden_stages)
    assert result.stages[0].input_bytes == 4 * batch * 8
    assert result.stages[0].flops == 2 * batch * 8 * hidden
    assert result.stages[1].flops == 2 * batch * hidden * hidden
    # Backward of a hidden layer: the weight's gradient and (but for the first) the input's.
    assert result.stages[1].backward_flops == 2 * result.stages[1].flops
    assert result.stages[0].backward_flops == result.stages[0].flops
    last = result.stages[-1]
    assert last.saved_bytes == 0 and last.output_bytes == 4 * batch * 4


def test_inference_peak_is_below_training_peak_and_counts_no_labels() -> None:
    result = memprop.profile(seed_workload(SeedConfig(depth=3, batch=64, hidden=128)))
    assert result.inference_peak_bytes < result.training_peak_bytes
    assert result.training_to_inference > 1


def test_flops_equal_torch_flop_counter() -> None:
    """The ledger's FLOP counts (its own matmul formulas, PyTorch's for the rest) against
    torch.utils.flop_counter over the same step, on a model with mm, addmm, bmm and conv."""
    from torch.utils.flop_counter import FlopCounterMode

    for factory in (ZOO["conv-bn"], ZOO["transformer"], ZOO["gelu-mlp"]):
        counter = FlopCounterMode(display=False)
        workload = factory()
        with counter:
            output = workload.model(*workload.inputs)
            loss, _ = compute_loss(workload, output)
            loss.backward()
        from memprop.trace.step import trace_training_step

        traced = trace_training_step(factory())
        assert traced.ledger.flops == counter.get_total_flops() > 0


def test_a_dtensor_is_counted_at_its_local_shard() -> None:
    # Oracle: the bytes of the local shard, counted by hand. In-place ops on a DTensor (an
    # optimizer's mul_, lerp_) make nothing new; an out-of-place one makes one local shard.
    from torch.distributed.tensor import Shard, distribute_tensor

    from memprop.distribute.fsdp import fake_group
    from memprop.trace.ledger import Category, StorageLedger

    with fake_group(0, 4) as mesh:
        sharded = distribute_tensor(torch.ones(64, 8), mesh, [Shard(0)])
        other = distribute_tensor(torch.ones(64, 8), mesh, [Shard(0)])
        shard_bytes = 16 * 8 * 4
        ledger = StorageLedger()
        ledger.register([sharded, other], Category.OPTIMIZER_STATE, "state")
        with ledger:
            sharded.mul_(0.5).lerp_(other, 0.1)
            made = sharded * 2
        assert [r.bytes for r in ledger.records] == [shard_bytes] * 3
        assert ledger.peak()[0] == 3 * shard_bytes
        assert ledger.record_of(made) is ledger.records[2]


def test_a_storage_resized_in_place_is_freed_and_born_again() -> None:
    # FSDP2's alloc_storage/free_storage: resize_(0) frees, resize_(n) allocates. Oracle: the
    # live bytes after each step, by hand.
    from memprop.trace.ledger import Category, StorageLedger

    original = torch.UntypedStorage.resize_
    gathered = torch.empty(256)  # 1 KiB, kept allocated between steps as FSDP2 does not
    gathered.untyped_storage().resize_(0)
    shard = torch.empty(64)  # 256 B
    ledger = StorageLedger()
    ledger.register([shard], Category.PARAMETERS, "shard")
    with ledger:
        gathered.untyped_storage().resize_(1024)
        gathered.mul_(2)
        gathered.untyped_storage().resize_(0)
        with StorageLedger() as inner:  # ledgers nest: both see the resize
            gathered.untyped_storage().resize_(1024)
        assert torch.UntypedStorage.resize_ is not original
        after = torch.empty(32)  # 128 B, born while the gathered block is live again
    assert torch.UntypedStorage.resize_ is original
    # Ticks: the start, the first resize (freed again after it), the second, the empty.
    assert ledger.live_after_bytes() == [256, 256, 1280, 1408]
    assert ledger.peak() == (1408, 3)
    assert [r.bytes for r in inner.records] == [1024]
    del after


def test_aten_resize_of_a_known_storage_is_a_new_allocation() -> None:
    from memprop.trace.ledger import Category, StorageLedger

    tensor = torch.empty(16)
    ledger = StorageLedger()
    ledger.register([tensor], Category.INPUTS, "input")
    with ledger:
        tensor.resize_(64)
    # Growing copies into a new block before the old one goes: both live at that tick.
    assert [r.bytes for r in ledger.records] == [64, 256]
    assert ledger.peak()[0] == 320
    assert ledger.live_after_bytes()[-1] == 256


_FIRST_FAKE_LLAMA = """
import torch
from memprop.trace.fake import new_fake_mode
from memprop.trace.step import trace_training
from memprop.workload import Workload

def llama():
    from transformers import LlamaConfig, LlamaForCausalLM  # imported inside the fake mode
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 16))
    return Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                    optimizer=torch.optim.AdamW(model.parameters()))

with new_fake_mode():
    fake = trace_training(llama()).steady.chain.traced_peak_bytes
real = trace_training(llama()).steady.chain.traced_peak_bytes
print(fake, real)
"""


def test_the_first_fake_hugging_face_model_of_a_process_equals_real() -> None:
    # A fresh interpreter, so that transformers is first imported inside the fake mode (NOTE
    # [ Fake tensors taken for tracing ]): fake took the packed-mask path, 147 KB high on Llama.
    import subprocess
    import sys

    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", _FIRST_FAKE_LLAMA], capture_output=True,
                          text=True, check=True)
    fake, real = map(int, done.stdout.split())
    assert fake == real


def _transformer_encoder() -> Workload:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.1,
                                       batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    return Workload(model=model, inputs=(torch.randn(32, 8, 64),),
                    optimizer=torch.optim.AdamW(model.parameters()))


def test_fake_equals_real_on_a_deep_copied_transformer_encoder() -> None:
    # nn.TransformerEncoder deep-copies its layer (NOTE [ Deep copies of fake tensors ]): the
    # fake trace kept a storage per weight transpose of every copied layer that real tensors
    # view in place.
    real = memprop.profile(_transformer_encoder())
    with new_fake_mode():
        fake_workload = _transformer_encoder()
    fake = memprop.profile(fake_workload)
    assert fake.memory == real.memory
    assert [(t.op, t.module, t.bytes) for t in fake.saved_tensors] == [
        (t.op, t.module, t.bytes) for t in real.saved_tensors]


class _AutocastMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256),
                                 nn.LayerNorm(256), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = self.net(x)
        return out


def _autocast_mlp() -> Workload:
    torch.manual_seed(0)
    model = _AutocastMLP()
    return Workload(model=model, inputs=(torch.randn(32, 64),),
                    targets=torch.randint(0, 10, (32,)), loss_fn=nn.functional.cross_entropy,
                    optimizer=torch.optim.AdamW(model.parameters()))


def test_fake_equals_real_under_autocast() -> None:
    # NOTE [ Layer norm's statistics ]: the CPU kernel saves a bf16 input's mean and 1/std in
    # float32; fake tensors gave them bf16, half the bytes.
    real = memprop.profile(_autocast_mlp())
    with new_fake_mode():
        fake_workload = _autocast_mlp()
    fake = memprop.profile(fake_workload)
    assert fake.memory == real.memory
    assert [(t.op, t.module, t.bytes) for t in fake.saved_tensors] == [
        (t.op, t.module, t.bytes) for t in real.saved_tensors]
