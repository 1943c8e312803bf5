"""Which packages the distribution holds, found rather than listed (the rest is pyproject.toml).

Every package under ``memprop/`` is found, so a new subpackage cannot be left out of the wheel;
the command line's folder ``cli/`` installs as ``memprop_cli``. pyproject.toml alone cannot say
both: its package finder takes folder names as package names, and a list there drifts (it once
missed ``memprop.blocks`` and ``memprop.distribute``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["memprop", "memprop.*"]), "memprop_cli"],
    package_dir={"memprop_cli": "cli"},
)
