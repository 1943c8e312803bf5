"""The runtime: a plan executed with nested ``torch.utils.checkpoint``, measured and checked."""

from memprop.run.measure import RunResult, run_plan
from memprop.run.wrapper import PlannedModule, checkpoint

__all__ = ["PlannedModule", "RunResult", "checkpoint", "run_plan"]
