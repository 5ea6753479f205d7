"""``report.html``: built from a real run of a small recipe, checked as a document, then opened in
a real headless browser (Debian's Chromium) that must lay out and draw every plot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import surgery
from surgery.contracts import Measured, evaluate
from surgery.quality import measure_quality
from surgery.report_html import layer_latency, pareto_front, report_html, write_report_html
from tests.helpers_models import wide_mlp

RECIPE = """decompose Linear rank = 0.25 progressive 2 steps
heal steps 6 lr 1e-3
expect params <= 95%
expect drift <= 0.9
expect similarity >= 0.5
expect agreement >= 0.2
"""

EXPLORED = [
    {"speedup": 1.2, "quality": 0.99, "metric": "similarity", "label": "r=0.75"},
    {"speedup": 1.6, "quality": 0.97, "metric": "similarity", "chosen": True},
    {"speedup": 1.4, "quality": 0.95, "metric": "similarity"},
    {"speedup": 2.0, "quality": 0.90, "metric": "similarity"},
]


def _run(measure: bool) -> Any:
    recipe = surgery.parse(RECIPE)
    run = surgery.Manager(recipe, wide_mlp()).run(measure=measure, warmup=1, repeats=3)
    # What the manager does once it hands quality contracts to `surgery.quality`.
    quality = measure_quality(
        [s for s in recipe.statements if s.verb == "expect"],
        run.original,
        run.model,
        calibration=run.calibration,
    )
    measured = Measured(
        run.params_before,
        run.params_after,
        run.flops_before,
        run.flops_after,
        run.drift,
        run.speed,
        run.verifications,
        quality,
    )
    run.contracts = [evaluate(s, measured) for s in recipe.statements if s.verb == "expect"]
    setattr(run, "quality", quality)  # noqa: B010 - the field the manager will carry
    return run


@pytest.fixture(scope="module")
def measured_run() -> Any:
    return _run(measure=True)


class _Doc(HTMLParser):
    """Tags, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)


def _doc(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


def _assert_self_contained(text: str, doc: _Doc) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert doc.count("script") == 0 and doc.count("link") == 0 and doc.count("img") == 0
    assert doc.count("iframe") == 0 and "@import" not in text
    for tag, attrs in doc.tags:
        assert "src" not in attrs, tag
        href = attrs.get("href") or attrs.get("xlink:href") or ""
        assert href == "" or href.startswith("#"), (tag, href)
    # The only URLs are XML namespace names, which nothing fetches.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls


def test_report_of_a_measured_run_has_every_plot(measured_run: Any, tmp_path: Path) -> None:
    run = measured_run
    run.heals[-1].evals[:] = [{"step": 3, "drift": 0.2}, {"step": 6, "drift": 0.15}]
    path = write_report_html(run, tmp_path / "report.html", explored=EXPLORED)
    text = path.read_text(encoding="utf-8")
    doc = _doc(text)
    _assert_self_contained(text, doc)
    # costs, latency, ranks, healing, Pareto front, predicted vs measured speedup
    assert doc.count("figure") == doc.count("svg") == 6
    ids = [a["id"] for _, a in doc.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "element ids repeat across figures"
    words = " ".join(doc.text)
    for title in (
        "parameters and FLOPs per changed layer",
        "measured latency per changed layer",
        "rank chosen per layer",
        "healing",
        "Pareto front",
        "predicted against measured speedup per target",
        "held-out drift",  # the heal's evaluations are plotted when it made any
        "auto search",
        "progressive family",
    ):
        assert title in words, title
    # the contracts table, with each measured contract's interval
    assert "95% interval" in words
    for contract in run.contracts:
        assert contract.text in words
        if contract.statement.metric.value in ("similarity", "agreement", "drift"):
            assert contract.interval is not None
            assert f"[{contract.interval[0]:.4g}, {contract.interval[1]:.4g}]" in words


def test_layer_latency_times_each_changed_layer(measured_run: Any) -> None:
    times = layer_latency(measured_run, repeats=2)
    assert set(times) == {"fc1", "fc2"}
    assert all(a is not None and b is not None and a > 0 and b > 0 for a, b in times.values())


def test_an_unmeasured_run_says_what_is_missing(tmp_path: Path) -> None:
    recipe = surgery.parse("decompose Linear rank = 0.25")
    run = surgery.Manager(recipe, wide_mlp()).run(measure=False)
    path = write_report_html(run, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    doc = _doc(text)
    _assert_self_contained(text, doc)
    assert doc.count("svg") == 2  # costs and ranks; nothing was timed, healed or explored
    words = " ".join(doc.text)
    assert "Per-layer latency was not measured" in words
    assert "Speed was not measured" in words


def test_an_explored_point_without_numbers_is_left_out(measured_run: Any) -> None:
    text = report_html(measured_run, explored=[{"speedup": None, "drift": 0.1}], latency={})
    assert "auto search" not in text


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [(1.0, 0.1), (2.0, 0.3), (1.5, 0.4), (2.5, 0.5), (2.5, 0.6)]
    assert pareto_front(points) == [0, 1, 3]


_PROBE = """<script>
const out = [...document.querySelectorAll('figure svg')].map(s => {
  const r = s.getBoundingClientRect(); const b = s.getBBox();
  return {w: r.width, h: r.height, bw: b.width, bh: b.height,
          shapes: s.querySelectorAll('path, use, rect, line, text').length};
});
const p = document.createElement('pre'); p.id = 'probe'; p.textContent = JSON.stringify(out);
document.body.appendChild(p);
</script>"""


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_a_headless_browser(measured_run: Any, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: `apt-get install chromium`)")
    text = report_html(measured_run, explored=EXPLORED)
    expected = _doc(text).count("svg")
    assert expected >= 4
    # A copy of the page with a probe that measures each plot as the browser laid it out.
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    plots = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(plots) == expected
    for i, plot in enumerate(plots):
        assert plot["w"] > 100 and plot["h"] > 100, (i, plot)  # laid out at a readable size
        assert plot["bw"] > 0 and plot["bh"] > 0 and plot["shapes"] > 10, (i, plot)  # drawn
