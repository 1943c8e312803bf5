"""The ledger sees the copies of the CPU generator's state that ``torch.utils.checkpoint`` makes
below the dispatcher (NOTE [ The generators' state a checkpoint keeps ]), on a CPU step only."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

from memprop.trace.ledger import Category, StorageLedger

STATE_BYTES = torch.get_rng_state().nbytes
ORIGINAL = torch.get_rng_state


def test_a_copy_of_the_state_is_born_at_its_own_tick_and_dies_when_dropped() -> None:
    with StorageLedger() as ledger:
        state = torch.get_rng_state()
        kept = torch.ones(10)  # an op after it: the state is still live at its tick
        del state
        torch.ones(3)
    assert torch.get_rng_state is ORIGINAL  # put back when the ledger exits
    [copy] = [r for r in ledger.records if r.op_name == "get_rng_state"]
    assert copy.bytes == STATE_BYTES
    assert copy.born == 1 and copy.freed == 2
    assert ledger.peak()[0] == STATE_BYTES + kept.untyped_storage().nbytes()


def test_a_checkpoint_around_dropout_keeps_one_state_until_its_backward() -> None:
    """The stash lives from the checkpoint's forward to its backward; fork_rng's copy through
    the re-run only: two states at the re-run's ops, one after it."""
    x = torch.randn(8, 8, requires_grad=True)
    with StorageLedger() as ledger:
        y = checkpoint(lambda t: torch.nn.functional.dropout(t.sin(), 0.5), x,
                       use_reentrant=False)
        y.sum().backward()
    states = [r for r in ledger.records if r.op_name == "get_rng_state"]
    assert [r.bytes for r in states] == [STATE_BYTES, STATE_BYTES]
    stash, fork = states
    assert stash.born < fork.born and fork.freed is not None and stash.freed is not None
    assert fork.freed <= stash.freed


def test_a_gpu_steps_ledger_does_not_count_host_memory() -> None:
    with FakeTensorMode():
        weight = torch.empty(4, device="cuda")
    ledger = StorageLedger()
    ledger.register([weight], Category.PARAMETERS, "weight")
    with ledger:
        torch.get_rng_state()
    assert all(r.op_name != "get_rng_state" for r in ledger.records)
