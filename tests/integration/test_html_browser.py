"""The HTML report in a real headless browser (Debian's chromium); skipped without one.

Set MEMPROP_SCREENSHOT=path to keep the screenshot (reports/profile-html.png is made so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import memprop
from memprop.report.html import write_html
from memprop.workload import SeedConfig, seed_workload

_BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_BROWSER is None, reason="needs chromium (apt-get install "
                                 "chromium)")]

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars"]


def _chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert _BROWSER is not None
    with tempfile.TemporaryDirectory() as profile_dir:
        return subprocess.run([_BROWSER, *_FLAGS, f"--user-data-dir={profile_dir}", *arguments],
                              capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = memprop.profile(seed_workload(SeedConfig(input_dim=64, hidden=128, classes=10,
                                                      depth=4, batch=32)))
    return Path(write_html(tmp_path_factory.mktemp("html") / "profile.html", result))


def test_the_page_renders_to_a_screenshot(page: Path, tmp_path: Path) -> None:
    target = Path(os.environ.get("MEMPROP_SCREENSHOT") or tmp_path / "profile.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(f"--screenshot={target.resolve()}", "--window-size=1200,1600",
                     page.resolve().as_uri())
    assert target.is_file(), done.stderr[-2000:]
    header = target.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1200, 1600)


def test_the_script_runs_and_the_figures_survive_the_dom(page: Path) -> None:
    done = _chromium("--dump-dom", page.resolve().as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'id="chart"' in dom and 'data-category="saved_activations"' in dom
    assert 'data-field="memory.training_peak_bytes"' in dom
