"""How a model is seen as a chain of blocks, and how a plan is installed on them: the one place
that knows both (``find`` and ``install``)."""

from memprop.blocks.find import BlockRun, find_run, runs
from memprop.blocks.install import Calls, installed

__all__ = ["BlockRun", "Calls", "find_run", "installed", "runs"]
