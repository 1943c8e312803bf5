"""How a plan is installed on a model's blocks (``install``, the runtime's). Finding the blocks
is tracing's (``memprop.trace.blocks``), re-exported here as before."""

from memprop.blocks.install import Calls, installed
from memprop.trace.blocks import BlockRun, find_run, runs

__all__ = ["BlockRun", "Calls", "find_run", "installed", "runs"]
