"""Saved HTML figures open offline: headless Chromium with the network cut draws the plot's SVG.

The control case (the same figure loading plotly.js from the CDN) must stay blank under the same cut,
so the test can tell an offline figure from one that needs the network. Deselect with `-m "not browser"`.
"""

from __future__ import annotations

import numpy as np
import pytest
from browser import LAUNCH_ARGS, require_browser
from metabolic.core.profiles import load_config
from metabolic.report.figures import PLOTLY_JS, binned_histogram, save_figure

pytestmark = pytest.mark.browser

# No route to anything: every http(s) request fails at once (file:// pages still load).
OFFLINE_ARGS = [*LAUNCH_ARGS, "--proxy-server=0.0.0.0:1", "--proxy-bypass-list=<-loopback>"]
DRAWN = "() => !!document.querySelector('.js-plotly-plot svg.main-svg .bars path, .js-plotly-plot svg.main-svg .point')"


def _figure():
    import plotly.graph_objects as go

    values = np.random.default_rng(0).gamma(2.0, size=5000)
    fig = go.Figure(binned_histogram(values, 40, name="draws", unit="draws"))
    fig.update_layout(title="gamma(2) draws", xaxis_title="value (units)", yaxis_title="draws per bin")
    return fig


def _drawn(page, path, timeout_ms: int) -> bool:
    page.goto(path.as_uri())
    try:
        page.wait_for_function(DRAWN, timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: nothing was drawn
        return False
    return True


def test_saved_html_figures_draw_with_the_network_cut(tmp_path, monkeypatch):
    sync_playwright, chromium = require_browser()
    monkeypatch.setenv("METABOLIC_FIGURES", str(tmp_path / "figures"))
    written = save_figure(_figure(), load_config("smoke"), "offline_check", "test_figures_browser")
    assert written["html"].parent / PLOTLY_JS == written["plotly.js"] and written["plotly.js"].stat().st_size > 1_000_000
    html = written["html"].read_text(encoding="utf-8")
    assert "cdn.plot.ly" not in html and f'src="{PLOTLY_JS}"' in html
    assert len(html) < 100_000  # the bins, not 5,000 raw values or a copy of plotly.js
    cdn = tmp_path / "cdn.html"
    cdn.write_text(_figure().to_html(include_plotlyjs="cdn", full_html=True), encoding="utf-8")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=OFFLINE_ARGS)
        page = browser.new_context(offline=True).new_page()
        assert _drawn(page, written["html"], 20_000), "the saved figure drew no plot offline"
        assert page.locator(".js-plotly-plot .bars path").count() == 40  # one bar per bin
        assert not _drawn(page, cdn, 3_000), "the CDN control drew a plot: the network was not cut"
        assert page.locator("#needs-plotly-js").count() == 0  # beside plotly.min.js: no note
        # copied alone, without plotly.min.js: no plot, and a note saying what the figure needs
        alone = tmp_path / "alone" / written["html"].name
        alone.parent.mkdir()
        alone.write_text(html, encoding="utf-8")
        assert not _drawn(page, alone, 3_000)
        assert "needs plotly.min.js in the same folder" in page.locator("#needs-plotly-js").inner_text()
        browser.close()


def test_every_figure_the_study_wrote_draws_with_the_network_cut():
    """Every plotly figure under the smoke run's figures folder (written by the notebooks, which nbval runs
    before the browser tests; 04_examples.html is coloured text, not a plot) draws offline."""
    from metabolic.core.artefacts import figures_dir

    figures = sorted(p for p in figures_dir("smoke").glob("*.html") if PLOTLY_JS in p.read_text(encoding="utf-8"))
    if not figures:
        pytest.skip(f"no study figures in {figures_dir('smoke')}: run the notebooks first (nbval or make study)")
    sync_playwright, chromium = require_browser()
    blank = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=OFFLINE_ARGS)
        page = browser.new_context(offline=True).new_page()
        for path in figures:
            page.goto(path.as_uri())
            try:
                page.wait_for_function("() => !!document.querySelector('.js-plotly-plot svg.main-svg')", timeout=20_000)
            except Exception:  # noqa: BLE001 - playwright's TimeoutError: nothing was drawn
                blank.append(path.name)
        browser.close()
    assert blank == [], f"drew nothing offline: {blank}"
    assert len(figures) >= 15  # the notebooks save at least this many figures on smoke
