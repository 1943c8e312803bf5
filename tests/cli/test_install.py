"""memprop as users install it: the wheel holds every package of the source tree.

The other tests run on an editable install, which imports from the checkout and so cannot see a
package that the wheel leaves out (``memprop.blocks`` and ``memprop.distribute`` once were).
CI also installs the wheel in a fresh environment and runs there, from a folder outside the
checkout, the tests marked ``install``: those that can see a broken install (every module
imported, every command once, a ``--model`` file, launched ranks that import memprop).
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import memprop
import memprop_cli

ROOT = Path(__file__).resolve().parents[2]
"""The checkout (absent when these tests run against an installed memprop, as CI's wheel job
does: there is no source tree to compare with then)."""


def _packages(folder: Path, name: str) -> set[str]:
    """Every package (a folder with ``__init__.py``) under ``folder``, as import names."""
    return {".".join((name, *init.parent.relative_to(folder).parts))
            for init in folder.rglob("__init__.py") if "__pycache__" not in init.parts}


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_the_command(tmp_path: Path) -> None:
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "memprop").is_dir():
        pytest.skip("no source tree here (memprop is installed): nothing to build")
    # Built from a copy, so that the build's own folders never land in the shared checkout.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("memprop", "cli"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("memprop-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    held = {name.rsplit("/", 1)[0].replace("/", ".") for name in files
            if name.endswith("/__init__.py")}
    expected = _packages(ROOT / "memprop", "memprop") | {"memprop_cli"}
    assert expected <= held, f"missing from the wheel: {sorted(expected - held)}"
    modules = {f"memprop_cli/{path.name}" for path in (ROOT / "cli").glob("*.py")}
    assert modules <= files, f"missing from the wheel: {sorted(modules - files)}"
    assert "memprop/py.typed" in files
    entry_points = next(name for name in files if name.endswith("entry_points.txt"))
    assert "memprop = memprop_cli.main:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()


@pytest.mark.install
def test_every_module_of_the_installed_packages_imports() -> None:
    # Most modules are imported lazily, by the command that needs them: a dependency the
    # install lacks, or a module the wheel left out that another imports at its top, shows
    # only when that command runs, or here. (A module no other imports at its top is seen by
    # the command tests marked install, and by the wheel's file list above.)
    for package in (memprop, memprop_cli):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
