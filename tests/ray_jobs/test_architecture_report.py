"""The architecture diagram of `semprobe run`: its files, its colours, and the report page in a real browser."""

import math
import os
import shutil
import xml.etree.ElementTree as ET

import matplotlib
import pyarrow.parquet as pq
import pytest

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = "/usr/bin/chromium"  # Debian's (apt-get install -y chromium); .ci/run installs it
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def reference_fill(accuracy: float, accuracies: list[float]) -> str:
    """The colour bar by hand: viridis from min(0.5, lowest rounded down to 0.05) to the best rounded up."""
    lo = min(0.5, min(math.floor(a * 20) / 20 for a in accuracies))
    hi = max(lo + 0.1, max(math.ceil(a * 20) / 20 for a in accuracies))
    rgb = matplotlib.colormaps["viridis"]((accuracy - lo) / (hi - lo))[:3]
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def test_run_writes_the_lite0_diagram_coloured_by_its_scores(default_run):
    out = default_run
    scores = sorted(pq.read_table(out / "scores.parquet").to_pylist(), key=lambda r: r["layer_index"])
    svg_path = out / "figures" / "efficientnet_lite0_architecture.svg"
    root = ET.parse(svg_path).getroot()  # parses as XML
    groups = root.findall(f".//{SVG}g[@class='layer']")
    assert [g.get("data-layer") for g in groups] == [r["layer"] for r in scores]  # once each, in order
    accuracies = [r["accuracy"] for r in scores]
    for g, r in zip(groups, scores):
        assert g.find(f"{SVG}rect").get("fill") == reference_fill(r["accuracy"], accuracies)
        assert g.find(f"{SVG}rect").get("stroke") == ("black" if r["significant"] else "#999")
        tip = g.get("data-tip")
        assert f"{r['accuracy']:.3f}" in tip and f"p_bhy {r['p_bhy']:.4f}" in tip
        assert f"n_concepts {r['n_concepts']}" in tip
    assert (out / "figures" / "efficientnet_lite0_architecture.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert report.count('<svg id="arch-efficientnet_lite0"') == 1
    assert "http" not in report  # self-contained: inline, the SVG needs no namespace URL
    assert "figures/efficientnet_lite0_architecture.png" in report


def browser():
    """Playwright's sync API and Debian's chromium, or a skip saying which is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium (as root) runs this browser test")
    playwright = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install -e '.[test]'")
    return playwright.sync_playwright


def test_report_page_shows_the_diagram_and_its_tooltips_in_a_headless_browser(default_run, tmp_path):
    sync_playwright = browser()
    out = default_run
    scores = sorted(pq.read_table(out / "scores.parquet").to_pylist(), key=lambda r: r["layer_index"])
    page_file = tmp_path / "report.html"
    shutil.copy(out / "report.html", page_file)  # what a reader opens: one file, offline
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=LAUNCH_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            diagram = page.locator("svg#arch-efficientnet_lite0")
            diagram.scroll_into_view_if_needed()
            assert diagram.is_visible()
            box = diagram.bounding_box()
            assert box["width"] > 200 and box["height"] > 200
            layers = diagram.locator("g.layer")
            assert layers.count() == len(scores)
            tip = diagram.locator("g.tip")
            assert not tip.is_visible()
            for r in (scores[0], scores[len(scores) // 2], scores[-1]):
                layer = diagram.locator(f"g.layer[data-layer='{r['layer']}']")
                assert layer.is_visible()
                layer.hover()
                tip.wait_for(state="visible", timeout=5000)
                lines = [t.text_content() for t in tip.locator("tspan").all()]
                std = "-" if r["std"] is None else f"{r['std']:.3f}"
                assert lines[0] == r["layer"]
                assert f"accuracy {r['accuracy']:.3f} ± {std}" in lines[1]
                assert lines[2].startswith(f"p_bhy {r['p_bhy']:.4f}")
                assert lines[3] == f"n_concepts {r['n_concepts']}"
                tip_box = tip.bounding_box()
                assert tip_box["width"] > 100 and tip_box["height"] > 40  # drawn, not an empty group
                page.mouse.move(1, 1)
                tip.wait_for(state="hidden", timeout=5000)
            assert errors == []
        finally:
            context.close()
