"""A Hugging Face model's key/value cache: found, and switched off while a step is traced,
planned or run (a training step never reads it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["caching_configs", "without_caches"]


def caching_configs(model: nn.Module) -> list[Any]:
    """The configs of a Hugging Face model's modules that keep a key/value cache
    (``use_cache=True``)."""
    configs = [getattr(m, "config", None) for m in model.modules()]
    return [c for c in configs if getattr(c, "use_cache", None) is True]


@contextlib.contextmanager
def without_caches(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's key/value cache off (``config.use_cache = False``) for the
    block: a recomputed block would append its keys and values to the cache a second time, so
    a planned step runs without one, as the library's own gradient checkpointing does; and the
    plan is made on the step as it will run."""
    configs = caching_configs(model)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True
