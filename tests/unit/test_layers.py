"""Layers that only point down: every import of memprop's own modules (``memprop/``, and
``cli/`` as ``memprop_cli``) goes to the importer's layer or a lower one.

The oracle is the source itself: each module's imports are read with ``ast`` (function-local and
``TYPE_CHECKING`` imports included: a type that names a higher layer is a dependency on it too),
nothing is imported. ``LAYERS`` is the one statement of the order (docs/architecture.md draws
it in words); a module belongs to the layer of its longest listed prefix.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS: tuple[tuple[str, ...], ...] = (
    # words every layer uses: errors, sizes, the version
    ("memprop.errors", "memprop.units", "memprop.search", "memprop._version", "memprop.files"),
    # blame for the user's code; the built-in models
    ("memprop.blame", "memprop.models", "memprop.zoo", "memprop.closed_form"),
    # what a step is made of
    ("memprop.workload",),
    # the machine: memory backends, its measured speed; one step of the user's loop
    ("memprop.devices", "memprop.calibration", "memprop.loop"),
    ("memprop.budget",),
    # tracing: the ledger, fake tensors, the calls, the run of blocks, the stages' costs
    ("memprop.trace",),
    # planning: the chain, the schedule, the solvers
    ("memprop.plan",),
    # running a plan (installing it on the blocks, measuring); estimates over many traces
    ("memprop.run", "memprop.estimate"),
    # spreading a step over ranks
    ("memprop.distribute",),
    # the public Python API (``import memprop``)
    ("memprop",),
    # rendering, then the benchmarks that render, then the command line
    ("memprop.report",),
    ("memprop.bench",),
    ("memprop_cli",),
)
"""memprop's layers, lowest first: a module may import its own layer and those below."""

ALLOWED: dict[tuple[str, str], str] = {}
"""Upward imports tolerated for now, ``(importer, imported) -> why``: each one a debt to pay."""


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "cli":
        parts[0] = "memprop_cli"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of ``module``'s longest listed prefix; None outside memprop."""
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path``; for ``from a import b``, ``a.b``
    when it is a module of memprop's (``from memprop import __version__`` is ``memprop``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((node.lineno, submodule if _is_module(submodule) else base))
    return sorted(found)


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "memprop_cli":
        parts[0] = "cli"
    elif parts[0] != "memprop":
        return False
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def upward_imports() -> list[str]:
    """Every import of a higher layer, as ``file:line importer -> imported (layer a < b)``."""
    sources = sorted([*ROOT.glob("memprop/**/*.py"), *ROOT.glob("cli/**/*.py")])
    found = []
    for path in sources:
        module = _module_name(path)
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to LAYERS"
        for line, imported in imports_of(path, module):
            theirs = layer_of(imported)
            if theirs is None or theirs <= own or (module, imported) in ALLOWED:
                continue
            found.append(f"{path.relative_to(ROOT)}:{line} {module} -> {imported} "
                         f"(layer {own} imports layer {theirs})")
    return found


def test_every_import_points_to_the_same_layer_or_below() -> None:
    """Oracle: LAYERS, the stated order, against every import statement in the source."""
    upward = upward_imports()
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_every_tolerated_upward_import_still_exists() -> None:
    """An exception that is no longer needed is removed from ALLOWED, so the list stays true."""
    sources = {_module_name(p): p for p in [*ROOT.glob("memprop/**/*.py"),
                                            *ROOT.glob("cli/**/*.py")]}
    for importer, imported in ALLOWED:
        assert importer in sources, f"{importer} is gone: drop it from ALLOWED"
        names = {name for _, name in imports_of(sources[importer], importer)}
        assert imported in names, f"{importer} no longer imports {imported}: drop it"


@pytest.mark.parametrize(("module", "imported", "upward"), [
    ("memprop.trace.step", "memprop.plan.api", True),
    ("memprop.plan.api", "memprop.trace.step", False),
    ("memprop.calibration.rates", "memprop.report.output", True),
    ("memprop_cli.plan", "memprop.plan.api", False),
    ("memprop.trace.profile", "memprop", True),
])
def test_the_order_reads_as_documented(module: str, imported: str, upward: bool) -> None:
    """Oracle: the order written in docs/architecture.md (trace below plan below the API
    and the CLI; calibration below report), on a few pairs."""
    own, theirs = layer_of(module), layer_of(imported)
    assert own is not None and theirs is not None
    assert (theirs > own) is upward
