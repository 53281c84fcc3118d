"""Saving plotly figures: HTML always, PNG when a Chrome/Chromium is available to kaleido.

Every figure is stamped with the profile, the notebook that made it and the config fingerprint, so a
PNG found in `figures/<profile>/` says where it came from. The HTML loads plotly.js from
`plotly.min.js` beside it (written once per folder, the installed plotly's copy), so the figures open
offline without carrying 4.6 MB each. `binned_histogram` keeps stored notebooks small: it plots bin
counts, not the raw values a plotly histogram embeds.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from metabolic.core import artefacts
from metabolic.core.config import StudyConfig

log = logging.getLogger(__name__)

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def png_backend_available() -> bool:
    """True when kaleido can find a browser to render PNGs."""
    import os

    return bool(os.environ.get("BROWSER_PATH")) or any(shutil.which(b) for b in _BROWSERS)


def stamp(fig, cfg: StudyConfig, notebook: str):
    """Add a small caption naming the profile, notebook and config fingerprint."""
    key = artefacts.fingerprint(cfg.to_dict())[:10]
    fig.add_annotation(
        text=f"profile={cfg.profile} · {notebook} · config {key}",
        xref="paper", yref="paper", x=1.0, y=-0.18, xanchor="right", yanchor="top",
        showarrow=False, font={"size": 9, "color": "#777"},
    )
    fig.update_layout(margin={"b": 80})
    return fig


_server_started = False


def _ensure_png_server() -> None:
    """Keep one headless browser alive for the process: the first PNG costs ~3 s, later ones ~0.3 s."""
    global _server_started
    import os

    if _server_started:
        return
    if not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = next(shutil.which(b) for b in _BROWSERS if shutil.which(b))
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    _server_started = True


PLOTLY_JS = "plotly.min.js"  # the HTML figures' script, beside them in the same folder


def ship_plotlyjs(folder: Path) -> Path:
    """Write the installed plotly's `plotly.min.js` into `folder` unless the same file is already there."""
    from plotly.offline import get_plotlyjs

    script = get_plotlyjs().encode("utf-8")
    path = folder / PLOTLY_JS
    if not (path.is_file() and path.stat().st_size == len(script) and path.read_bytes() == script):
        artefacts.atomic_write_bytes(path, script)
    return path


def binned_histogram(values, nbins: int = 80, name: str = "", unit: str = "values"):
    """A histogram as bars of precomputed counts over `nbins` equal bins (NaN/inf dropped).

    A plotly histogram embeds every raw value in the figure (50,257 per vocabulary histogram, 0.5 MB in
    a stored notebook); this embeds `nbins` counts. Hover shows each bin's range and count of `unit`.
    """
    import plotly.graph_objects as go

    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return go.Bar(x=[], y=[], name=name)
    counts, edges = np.histogram(x, bins=nbins)
    return go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=name,
                  customdata=np.stack([edges[:-1], edges[1:]], axis=1), marker={"line": {"width": 0}},
                  hovertemplate=f"%{{customdata[0]:.4g}} .. %{{customdata[1]:.4g}}: %{{y}} {unit}<extra>{name}</extra>")


def vocabulary_histogram(costs, title: str, cost_title: str, decimals: int = 4):
    """Histogram of one cost per vocabulary token (80 bins, log counts) with the mean and median marked,
    each written to `decimals` places."""
    import plotly.graph_objects as go

    costs = np.asarray(costs, dtype=np.float64)
    mean, median = float(costs.mean()), float(np.median(costs))
    fig = go.Figure(binned_histogram(costs, 80, name="tokens", unit="tokens"))
    fig.add_vline(x=mean, line_dash="dash", annotation_text=f"mean {mean:.{decimals}f}")
    fig.add_vline(x=median, line_dash="dot", annotation_text=f"median {median:.{decimals}f}", annotation_position="bottom right")
    fig.update_layout(title=f"{title}<br><sup>n = {costs.size:,} vocabulary tokens in 80 equal bins</sup>",
                      xaxis_title=cost_title, yaxis_title="tokens per bin (log scale)", yaxis_type="log", bargap=0)
    return fig


def extremes_box(costs, tokens, title: str, cost_title: str, n: int = 100):
    """Box plots of the `n` cheapest and `n` most expensive tokens by `costs`; token text on hover."""
    import plotly.graph_objects as go

    costs = np.asarray(costs, dtype=np.float64)
    order = np.argsort(costs, kind="stable")
    cheap, dear = order[:n], order[::-1][:n]
    fig = go.Figure([
        go.Box(y=costs[cheap], name=f"{n} cheapest tokens", boxpoints="all", text=[tokens[i] for i in cheap]),
        go.Box(y=costs[dear], name=f"{n} most expensive tokens", boxpoints="all", text=[tokens[i] for i in dear]),
    ])
    fig.update_layout(title=f"{title}<br><sup>n = {n} tokens per box (points: each token, text on hover); "
                            f"box: median and quartiles</sup>",
                      xaxis_title=f"token group (of {costs.size:,})", yaxis_title=cost_title, showlegend=False)
    return fig


# The HTML loads plotly.min.js from its own folder (one copy per folder, not 3.5 MB per figure): a figure
# copied alone says what it needs instead of opening blank (the script tag's onerror adds the note).
MISSING_JS_NOTE = ('<p id="needs-plotly-js" style="font-family:sans-serif;color:#b00">This figure needs '
                   '<code>plotly.min.js</code> in the same folder (it lies beside every figure in figures/&lt;profile&gt;/): '
                   'copy both files, or open the PNG.</p>')


def _with_missing_js_note(page: str) -> str:
    """`page` with a note shown when plotly.min.js fails to load (the figure was copied without it)."""
    import html as html_lib
    import json

    tag = '<script charset="utf-8" src="plotly.min.js"></script>'
    handler = html_lib.escape(f"document.body.insertAdjacentHTML('afterbegin', {json.dumps(MISSING_JS_NOTE)})", quote=True)
    return page.replace(tag, f'<script charset="utf-8" src="plotly.min.js" onerror="{handler}"></script>', 1)


def save_figure(fig, cfg: StudyConfig, name: str, notebook: str) -> dict[str, Path]:
    """Write `figures/<profile>/<name>.html` (with `plotly.min.js` beside it) and, if possible, `.png`;
    return the paths written."""

    folder = artefacts.figures_dir(cfg.run_name)
    folder.mkdir(parents=True, exist_ok=True)
    stamp(fig, cfg, notebook)
    written = {"plotly.js": ship_plotlyjs(folder)}
    html = folder / f"{name}.html"
    artefacts.atomic_write_text(html, _with_missing_js_note(fig.to_html(include_plotlyjs="directory", full_html=True)))
    written["html"] = html
    if png_backend_available():
        try:
            _ensure_png_server()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "kopts ignored with a server": expected
                # the figure's own height when it sets one (grids of panels need more than 520 px)
                png = fig.to_image(format="png", width=900, height=fig.layout.height or 520, scale=1.5)
        except Exception as exc:  # noqa: BLE001 - a PNG is a convenience; the HTML is already written
            log.warning("PNG export of %s failed (%s); the HTML is written", name, str(exc).splitlines()[0][:160])
        else:
            path = folder / f"{name}.png"
            artefacts.atomic_write_bytes(path, png)
            written["png"] = path
    else:
        log.warning("no Chrome/Chromium for PNG export of %s: install chromium (Debian) or set BROWSER_PATH", name)
    return written
