from __future__ import annotations

import os

import pytest
import torch

WORKERS = int(os.environ.get("MEMPROP_TEST_WORKERS", "1"))
"""pytest-xdist workers for the whole suite, 1 (none) unless MEMPROP_TEST_WORKERS says more.
Off by default: on two workers, plans priced by rates and pointwise timings measured while the
other worker ran differed from a serial run's (the README example's overhead read 0.34 for
0.17 in CI). More than 2 would multiply the ranks the distribute tests launch."""


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # The whole suite (`python -m pytest` with no paths: the README's command, and CI's) runs on
    # WORKERS pytest-xdist workers, each test in one worker's process as before (what they
    # measure is per process: the allocator, the ledger, their own launched ranks). A
    # selection of tests runs in this process, as a developer's single test wants (prints,
    # --pdb); `-n N` or `-p no:xdist` choose otherwise. Runs before xdist's own hook, which
    # turns these options into workers.
    if (config.args_source is pytest.Config.ArgsSource.TESTPATHS
            and config.pluginmanager.hasplugin("xdist")
            and not hasattr(config, "workerinput")
            and config.getoption("numprocesses", None) is None
            and config.getoption("dist", "no") == "no"
            and not config.getoption("usepdb") and not config.getoption("collectonly")
            and WORKERS > 1 and (os.cpu_count() or 1) >= WORKERS):
        config.option.numprocesses = WORKERS
        # Tests take from a second to a minute: a worker that runs out takes the other's.
        config.option.dist = "worksteal"


def pytest_sessionstart(session: pytest.Session) -> None:
    # On pytest-xdist's workers: this machine's rates measured here, before the workers start
    # (xdist starts them last), as a serial run measures them with nothing else of the suite
    # running; measured with a worker's tests beside them, they price plans otherwise (the
    # README's example's overhead is checked to two figures: 0.18 for 0.17 was seen).
    config = session.config
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return
    from memprop.calibration.rates import machine_rates

    cache = config._tmp_path_factory.getbasetemp() / "cache"  # the workers' (_rates_cache)
    cache.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)
    machine_rates("cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _rates_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The roofline cost model measures this machine's rates (and distribute its links) once
    # and caches them under XDG_CACHE_HOME: once per test run, never in the user's own cache.
    # pytest-xdist's workers share one (their temporary folders' parent is the run's): the
    # cache's lock lets one measure while the others wait, then read, so a run measures once.
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    cache = base / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)
