"""Will it fit: training and inference peaks over a grid of batch sizes and depths, and the
largest batch that fits a budget, both traced on fake tensors unless asked to run for real."""

from memprop.estimate.fit import FitProbe, FitResult, Verification, fit
from memprop.estimate.sweep import (
    Build,
    LineFit,
    Sweep,
    SweepCell,
    factory_builder,
    fit_line,
    seed_builder,
    sweep,
)

__all__ = [
    "Build",
    "FitProbe",
    "FitResult",
    "LineFit",
    "Sweep",
    "SweepCell",
    "Verification",
    "factory_builder",
    "fit",
    "fit_line",
    "seed_builder",
    "sweep",
]
