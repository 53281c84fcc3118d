"""Figure helpers: binned histograms keep the counts (not the raw values), every statistical figure
names its n and its axes, saved HTML carries plotly.js beside it."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.profiles import load_config
from metabolic.report import budget_figures as bf
from metabolic.report.figures import PLOTLY_JS, binned_histogram, save_figure


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.just(float("inf"))), min_size=1, max_size=300),
       st.integers(1, 50))
def test_binned_histogram_counts_every_finite_value_once(values, nbins):
    bar = binned_histogram(values, nbins)
    finite = np.isfinite(np.asarray(values))
    assert int(np.sum(bar.y)) == int(finite.sum())
    if finite.any():
        assert len(bar.x) == nbins
        lo, hi = bar.customdata[:, 0], bar.customdata[:, 1]
        assert np.all(lo <= hi) and np.allclose(lo[1:], hi[:-1])  # contiguous bins
        x = np.asarray(values)[finite]
        assert lo[0] <= x.min() and hi[-1] >= x.max()  # numpy widens a zero-width range by 0.5 each side
        if x.max() > x.min():
            assert (lo[0], hi[-1]) == (x.min(), x.max())


def test_vocabulary_histogram_stores_bins_not_tokens():
    costs = np.random.default_rng(1).lognormal(size=50_257)
    fig = bf.cost_histogram(costs, "costs")
    assert len(json.dumps(fig.to_plotly_json(), default=str)) < 20_000  # 50,257 raw floats would be ~1 MB
    assert fig.data[0].y.sum() == costs.size
    assert "n = 50,257 vocabulary tokens" in fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def _records(levels=(1.0, 2.0), per_level=3, prompts=("a", "b", "c")):
    out = []
    for variant in ("faithful", "expected-cost"):
        for b in levels:
            for i in range(per_level):
                out.append({"variant": variant, "decoding": "steered", "budget_csc": b, "csc": b * (0.9 + 0.1 * i),
                            "prompt": prompts[i % len(prompts)], "level": str(b)})
    out.append({"variant": "faithful", "decoding": "unbudgeted", "budget_csc": float("inf"), "csc": 5.0, "prompt": "a", "level": "-"})
    return out


def test_reliability_curve_says_n_prompts_and_error_bars():
    fig = bf.reliability_curve(_records(), "reliability", key="csc")
    means = [t for t in fig.data if t.error_y and t.error_y.array is not None]
    assert [t.name for t in means] == ["expected-cost / steered (n = 3 per level)", "faithful / steered (n = 3 per level)"]
    np.testing.assert_allclose(means[0].error_y.array, [np.std([0.9, 1.0, 1.1]), np.std([1.8, 2.0, 2.2])])
    assert "12 generations from 3 prompts" in fig.layout.title.text and "±1 SD" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "target budget (CSC units)"
    assert fig.layout.yaxis.title.text == "achieved true CSC (CSC units)"
    assert bf.reliability_curve([], "empty", key="proxy").layout.xaxis.title.text == "calibrated budget (proxy units)"


def test_saved_html_loads_plotly_from_beside_it(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    monkeypatch.setenv("METABOLIC_FIGURES", str(tmp_path))
    cfg = load_config("smoke")
    first = save_figure(go.Figure(go.Bar(x=[1], y=[2])), cfg, "a", "test")
    assert first["plotly.js"] == first["html"].parent / PLOTLY_JS
    assert first["plotly.js"].read_text(encoding="utf-8") == get_plotlyjs()
    mtime = first["plotly.js"].stat().st_mtime_ns
    second = save_figure(go.Figure(go.Bar(x=[1], y=[2])), cfg, "b", "test")
    assert second["plotly.js"].stat().st_mtime_ns == mtime  # written once per folder, not per figure
    html = second["html"].read_text(encoding="utf-8")
    assert f'<script charset="utf-8" src="{PLOTLY_JS}" onerror=' in html and "cdn.plot.ly" not in html
