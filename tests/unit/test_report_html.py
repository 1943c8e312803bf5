"""The HTML report: self-contained, and every visible figure is the embedded JSON's."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import memprop
from memprop.report.html import render_html, write_html
from memprop.units import format_bytes
from memprop.workload import SeedConfig, seed_workload


class _Figures(HTMLParser):
    """Collects the embedded document and every element that carries a figure."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict[str, str | None]] = []
        self.figures: list[tuple[str, int, str]] = []
        self.data = ""
        self.in_data = False
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("src", "href"):
            if attributes.get(name):
                self.external.append(f"{tag} {name}={attributes[name]}")
        if tag == "script" and attributes.get("type") == "application/json":
            self.in_data = True
        attributes["_text"] = ""
        self.stack.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        attributes = self.stack.pop()
        self.in_data = False
        if "data-field" in attributes:
            self.figures.append((str(attributes["data-field"]), int(str(attributes["data-bytes"])),
                                 str(attributes["_text"])))
        if self.stack:
            self.stack[-1]["_text"] = str(self.stack[-1]["_text"]) + str(attributes["_text"])

    def handle_data(self, data: str) -> None:
        if self.in_data:
            self.data += data
        if self.stack:
            self.stack[-1]["_text"] = str(self.stack[-1]["_text"]) + data


def _lookup(document: Any, path: str) -> Any:
    for part in path.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


@pytest.fixture(scope="module")
def profile() -> memprop.Profile:
    return memprop.profile(seed_workload(SeedConfig(input_dim=16, hidden=32, classes=4,
                                                    depth=3, batch=8)))


def test_visible_figures_come_from_the_embedded_json(profile: memprop.Profile) -> None:
    page = render_html(profile.to_dict(timeline=True))
    parser = _Figures()
    parser.feed(page)
    embedded = json.loads(parser.data)
    assert embedded == json.loads(json.dumps(profile.to_dict(timeline=True)))
    fields = {field for field, _, _ in parser.figures}
    assert {"memory.training_peak_bytes", "memory.inference_peak_bytes",
            "memory.parameters_bytes", "memory.saved_activations_bytes",
            "peak.breakdown.temporaries", "saved_tensors.0.bytes", "stages.0.saved_bytes",
            "closed_form.training_peak_bytes"} <= fields
    assert len(parser.figures) > 20
    for field, value, text in parser.figures:
        assert _lookup(embedded, field) == value, field
        assert text == format_bytes(value), field
    assert embedded["memory"]["training_peak_bytes"] == profile.training_peak_bytes


def test_the_page_is_self_contained(profile: memprop.Profile, tmp_path: Path) -> None:
    path = Path(write_html(tmp_path / "report.html", profile))
    page = path.read_text(encoding="utf-8")
    parser = _Figures()
    parser.feed(page)
    assert parser.external == []
    assert not re.search(r"https?://|@import|url\(|fetch\(|XMLHttpRequest", page)
    assert page.count("<svg") == 1 and page.startswith("<!DOCTYPE html>")


def test_the_chart_stacks_every_category_that_holds_memory(profile: memprop.Profile) -> None:
    page = render_html(profile.to_dict(timeline=True))
    drawn = re.findall(r'data-category="(\w+)"', page)
    held = [c for c, curve in profile.timeline.curves.items() if any(curve)]
    assert drawn == held
    assert ">forward<" in page and ">backward<" in page
    assert f"at tick {profile.timeline.peak_tick} " in page


def test_script_closing_tags_in_names_cannot_end_the_data(profile: memprop.Profile) -> None:
    document = profile.to_dict(timeline=True)
    document["workload"]["name"] = "</script><b>x"
    page = render_html(document)
    parser = _Figures()
    parser.feed(page)
    assert json.loads(parser.data)["workload"]["name"] == "</script><b>x"
