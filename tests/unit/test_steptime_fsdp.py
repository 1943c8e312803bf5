"""FSDP2's collectives in the step-time model, each against a hand computation: their price
over given links (a ring's all-gather and reduce-scatter per unit), and the scale that a
microbatch timed on real ranks and under the fake group puts on that price (NOTE [ FSDP2's
collectives on real ranks ])."""

from __future__ import annotations

import pytest
import torch

from memprop.distribute.communication import communication
from memprop.distribute.steptime import ShardedCosts, collectives_scale
from memprop.distribute.strategies.fsdp import collectives_s


def test_the_scale_is_what_real_ranks_spend_beyond_the_fake_group_over_the_price() -> None:
    # Real ranks: 150 ms a microbatch; the fake group (collectives moving nothing): 60 ms; the
    # collectives priced at 45 ms: they really take 90 ms, twice their price.
    assert collectives_scale(0.150, 0.060, 0.045) == pytest.approx(2.0)
    assert collectives_scale(0.050, 0.060, 0.045) == 0.0  # noise below the fake step
    assert collectives_scale(0.150, 0.060, 0.0) == 1.0  # nothing priced: nothing to scale


def test_a_microbatchs_collectives_are_two_gathers_and_a_scatter_of_each_unit() -> None:
    # Two ranks over a link of 1 GB/s and 100 us a message: a unit of B bytes costs
    # 3 (100 us + B / 2 / 1e9 s); the units: block "0" (16x8 weight + 16 bias = 144 floats,
    # 576 B), block "1" (4x16 + 4 = 68 floats, 272 B), and the root's rest (nothing: 0 B).
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    comm = communication("gloo", 2, (1e9, 1e-4))
    hand = sum(3 * (1e-4 + nbytes / 2 / 1e9) for nbytes in (576, 272, 0))
    assert collectives_s(comm, model, ("0", "1")) == pytest.approx(hand)
    assert not comm.timed_here  # a link given: real ranks here do not rescale it


def test_sharded_costs_unmeasured_leave_the_collectives_at_their_price() -> None:
    assert ShardedCosts(per_microbatch_s=0.0, per_step_s=0.0).collectives_scale == 1.0
