"""Split a training step across devices, or accumulate smaller microbatches on one? Every
candidate predicted per rank from the ledger, the fastest that fits chosen, and, with
``run=True``, run on ``torch.distributed`` and measured per rank.

The candidates come from the registered strategies (``memprop.distribute.strategies``; NOTE
[ One contract for a strategy ] in ``memprop.distribute.strategy``), one module each:

- ``accumulate``: one device, the batch in ``M`` microbatches, gradients accumulated in place
  across them, one optimizer step; with memprop's recomputation plan when the microbatch step
  does not fit the budget alone.
- ``ddp``: ``N`` ranks, each with ``batch / N`` (in ``M`` microbatches, ``no_sync`` until the
  last), ``DistributedDataParallel`` over them.
- ``zero1``: DDP with the optimizer's state sharded by ``ZeroRedundancyOptimizer`` (NOTE
  [ What a ZeRO-1 rank holds ]); asked for by name.
- ``fsdp``: ``N`` ranks under FSDP2, each block a unit (``memprop.distribute.fsdp``; NOTE
  [ Predicting FSDP2 with a fake process group ]).
- ``pipeline``: ``N`` ranks running one of ``torch.distributed.pipelining``'s schedules over
  ``M`` microbatches, the model's ``nn.Sequential`` cut between its items
  (``memprop.distribute.pipeline``; NOTE [ Replaying a pipeline schedule ]).

NOTE [ What each rank holds ]
A rank's step is the single-device step of its microbatch, traced by the ledger at its steady
state, with the gradients as accumulation leaves them: from the second microbatch on they are
live through forward and backward, as a loop that zeroes them with ``set_to_none=False`` holds
them (so that is the trace, unless ``M == 1``). DDP adds its gradient buckets: with torch's
default ``gradient_as_bucket_view=False`` every gradient is copied into a flat bucket that
lives as long as the wrapper, as many bytes as the gradients themselves. Measured on gloo: the
per-rank peak is the single-device peak at ``batch / N`` plus those bytes, to the byte.
"""

from __future__ import annotations

from memprop.distribute.api import Candidate, Distribution, Rank, distribute

__all__ = ["Candidate", "Distribution", "Rank", "distribute"]
