"""Notebook 06 in a real browser: JupyterLab in headless Chromium (Playwright), every control moved by
mouse or keyboard, the text, the spend and the gauge read back from the page.

The notebook runs on the smoke profile's artefacts wherever the notebooks find them ($METABOLIC_DATA,
else data/); its cells build any that are missing, as in any run (minutes on a CPU). In a full run it
comes last (tests/conftest.py), after nbval has built them in the same folder. A screenshot of the widget with a generated text is kept as
figures/smoke/06_explorer_browser.png (git-ignored, like every figure).
Deselect with `-m "not browser"`.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser import LAUNCH_ARGS, require_browser

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_budget_explorer.py"
SCREENSHOT = ROOT / "figures" / "smoke" / "06_explorer_browser.png"
ARTEFACT_BUILD_S = 1800  # the first render waits for missing smoke artefacts to be built
STEP_S = 120  # one regeneration (steered generation, < 1 s alone; a loaded 2-core machine once took > 60 s)
MIN_TOKENS = 8  # "resample" until a sample is this long, so budget and max tokens can shorten it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    end = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.3)


def _explorer_notebook(folder: Path) -> Path:
    """Notebook 06 up to its widget cell (the checks after it are nbval's job), without stored outputs."""
    import jupytext
    import nbformat

    nb = jupytext.read(NOTEBOOK)
    widget = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() == "explorer.widget()")
    nb.cells = nb.cells[: widget + 1]
    path = folder / "06_budget_explorer.ipynb"
    nbformat.write(nb, path)
    return path


class Page:
    """The explorer as the page shows it; controls are found by their `metabolic-<name>` CSS class."""

    def __init__(self, page) -> None:
        self.page = page

    def renders(self) -> int:
        value = self.page.locator(".metabolic-status [data-renders]").get_attribute("data-renders")
        return int(value)

    def state(self) -> dict[str, object]:
        status = self.page.locator(".metabolic-status").inner_text()
        match = re.search(r"seed (-?\d+): (\d+) tokens, true CSC ([\d.]+) of ([\d.]+)", status)
        assert match, f"unexpected status line: {status!r}"
        return {"text": self.page.locator(".metabolic-output").inner_text(), "gauge": self.page.locator(".metabolic-gauge").inner_text(),
                "seed": int(match[1]), "tokens": int(match[2]), "spent": float(match[3]), "budget": float(match[4]),
                "status": status, "renders": self.renders()}

    def committed(self, before: int, timeout_s: float = STEP_S) -> dict[str, object]:
        """Wait for the next render after `before`, then check it was exactly one regeneration."""
        self.page.wait_for_function(
            f"() => {{ const s = document.querySelector('.metabolic-status [data-renders]'); "
            f"return s && Number(s.getAttribute('data-renders')) > {before}; }}", timeout=timeout_s * 1000)
        self.page.wait_for_timeout(500)  # a second regeneration (e.g. one per keystroke) would show by now
        state = self.state()
        assert state["renders"] == before + 1, f"one change gave {state['renders'] - before} regenerations"
        return state

    def ids(self) -> tuple[list[int], list[int]]:
        """The shown text's prompt and generated token ids (data attributes of the status line)."""
        span = self.page.locator(".metabolic-status [data-renders]")
        return tuple([int(i) for i in (span.get_attribute(name) or "").split(",") if i]
                     for name in ("data-prompt-ids", "data-generated-ids"))

    def check_true_csc(self, state: dict[str, object], labeller) -> None:
        """The true CSC the page shows is the labeller's total for the shown text, labelled here on its own."""
        prompt, generated = self.ids()
        assert len(generated) == state["tokens"], state["status"]
        full = prompt + generated
        (lab,) = labeller.label([full], [np.arange(len(prompt), len(full))])
        total = float(np.asarray(lab, dtype=np.float64)[len(prompt):].sum()) * len(full)  # the length-aware scale
        assert abs(state["spent"] - total) <= 5e-4 + 1e-5 * total, (state["status"], total)

    def compare(self) -> list[dict[str, object]]:
        """Click "low / medium / high" and read the three columns: budget, tokens and text of each."""
        self.page.locator("button.metabolic-compare").click()
        self.page.wait_for_selector(".metabolic-levels-view", timeout=STEP_S * 1000)
        columns = self.page.locator(".metabolic-levels-view > div").all_inner_texts()
        self.page.evaluate("() => document.querySelector('.metabolic-levels-view').remove()")  # the next click waits anew
        assert len(columns) == 3, columns
        return [{"budget": float(m[1]), "tokens": int(m[2]), "text": c}
                for c in columns for m in [re.search(r"\(budget ([\d.]+) CSC, (\d+) tokens\)", c)]]

    def readout(self, name: str) -> str:
        return self.page.locator(f".metabolic-{name} .widget-readout").inner_text().strip()

    def type_into(self, name: str, text: str, selector: str = "input") -> dict[str, object]:
        """Replace a box's (or a slider readout's) content key by key, then Enter."""
        before = self.renders()
        box = self.page.locator(f".metabolic-{name} {selector}")
        box.click()
        box.press("Control+A")
        box.press_sequentially(text, delay=15)
        box.press("Enter")
        return self.committed(before)

    def drag_slider(self, name: str, fraction: float) -> dict[str, object]:
        """Drag a slider's handle with the mouse to `fraction` of its track, then release."""
        before = self.renders()
        # the mouse acts where the page shows the slider: bring it into the viewport first (the notebook's
        # legend above the widget is taller than the window)
        self.page.locator(f".metabolic-{name} .noUi-target").scroll_into_view_if_needed()
        handle = self.page.locator(f".metabolic-{name} .noUi-handle").bounding_box()
        track = self.page.locator(f".metabolic-{name} .noUi-target").bounding_box()
        y = handle["y"] + handle["height"] / 2
        self.page.mouse.move(handle["x"] + handle["width"] / 2, y)
        self.page.mouse.down()
        self.page.mouse.move(track["x"] + track["width"] * fraction, y, steps=8)
        self.page.mouse.up()
        return self.committed(before)


def _labeller():
    """The smoke profile's exact CSC labeller, in this process: what the page's true CSC is checked against."""
    from metabolic.core.profiles import load_config
    from metabolic.pipeline.csc import csc_labeller

    return csc_labeller(load_config("smoke"), device="cpu")


def _changed(before: dict, after: dict, what: str, spend: bool = True) -> None:
    assert after["text"] != before["text"], f"{what}: the text did not change"
    if spend:
        assert after["spent"] != before["spent"], f"{what}: the spend did not change ({after['status']})"
        assert after["gauge"] != before["gauge"], f"{what}: the gauge did not change"


def test_every_control_regenerates_the_text_in_jupyterlab(tmp_path):
    sync_playwright, chromium = require_browser()
    notebook = _explorer_notebook(tmp_path)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "METABOLIC_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = open(tmp_path / "lab.log", "w")
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api?token={token}", 60)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
            page.wait_for_function(
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget; "
                "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel; "
                "return k && k.status === 'idle'; }", timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            ui = Page(page)
            page.wait_for_selector(".metabolic-status [data-renders]", timeout=ARTEFACT_BUILD_S * 1000)
            first = ui.state()
            assert first["renders"] == 1, first
            # every control's label is shown whole (none cut off to "budget (C…")
            # nothing wider than the widget: it would scroll sideways (on focus) and hide the text's left edge
            assert page.evaluate("() => [...document.querySelectorAll('.widget-vbox, .widget-hbox')]"
                                 ".every(b => b.scrollWidth <= b.clientWidth)"), "the explorer overflows its box"
            labels = page.evaluate("() => [...document.querySelectorAll('[class*=metabolic-] .widget-label')]"
                                   ".filter(l => l.textContent).map(l => [l.textContent, l.scrollWidth <= l.clientWidth])")
            assert sorted(labels) == sorted([name, True] for name in ("prompt", "budget (CSC)", "temperature", "max tokens",
                                                                       "verified N", "seed", "mode", "colour by")), \
                f"labels cut off or missing: {labels}"

            assert "the expected-cost model of the smoke run" in page.locator(".metabolic-source").inner_text()
            labeller = _labeller()
            ui.check_true_csc(first, labeller)

            # both modes, at the study's levels: low / medium / high side by side, then the budget typed from the
            # lowest level to the highest
            levels = ui.compare()
            assert [c["tokens"] for c in levels] == sorted({c["tokens"] for c in levels}), levels  # strictly longer
            lowest = ui.type_into("budget", f"{levels[0]['budget']:.3f}", selector=".widget-readout")
            highest = ui.type_into("budget", f"{levels[-1]['budget']:.3f}", selector=".widget-readout")
            assert highest["tokens"] > lowest["tokens"], (lowest["status"], highest["status"])
            ui.check_true_csc(highest, labeller)
            before = ui.renders()
            page.locator(".metabolic-mode button", has_text="verified").click()  # N = 8: one regeneration
            verified = ui.committed(before)
            assert "candidate" in verified["status"], verified["status"]  # the verified controller's status line
            levels = ui.compare()
            assert [c["tokens"] for c in levels] == sorted({c["tokens"] for c in levels}), levels
            assert all("(in band)" in c["text"] for c in levels), levels
            lowest = ui.type_into("budget", f"{levels[0]['budget']:.3f}", selector=".widget-readout")
            highest = ui.type_into("budget", f"{levels[-1]['budget']:.3f}", selector=".widget-readout")
            assert highest["tokens"] > lowest["tokens"], (lowest["status"], highest["status"])
            assert "(in band)" in lowest["status"] and "(in band)" in highest["status"], (lowest["status"], highest["status"])
            ui.check_true_csc(highest, labeller)
            before = ui.renders()
            page.locator(".metabolic-mode button", has_text="proxy").click()
            ui.committed(before)

            # budget, dragged to the top of its range: budget forcing holds EOS back, so the text grows with it
            top = ui.drag_slider("budget", 1.0)
            assert top["budget"] > first["budget"] and top["tokens"] > first["tokens"], (first["status"], top["status"])

            # "resample": the next seed on each click, until a sample is long enough to be cut short.
            state = top
            for _ in range(25):
                before = state["renders"]
                page.locator("button.metabolic-resample").click()
                state = ui.committed(before)
                if state["tokens"] >= MIN_TOKENS:
                    break
            assert state["tokens"] >= MIN_TOKENS and state["seed"] > top["seed"], state
            _changed(top, state, "resample")
            long = state

            # seed, typed: the first seed gives its sample again (same seed, same text), then back
            again = ui.type_into("seed", str(top["seed"]))
            assert (again["text"], again["spent"], again["gauge"]) == (top["text"], top["spent"], top["gauge"])
            _changed(long, again, "seed")
            state = ui.type_into("seed", str(long["seed"]))
            assert (state["text"], state["spent"]) == (long["text"], long["spent"])

            # max tokens, typed in the slider's readout: half the sample's length cuts it short
            max_tokens = ui.readout("max_new_tokens")
            shorter = ui.type_into("max_new_tokens", str(long["tokens"] // 2), selector=".widget-readout")
            _changed(state, shorter, "max tokens")
            assert shorter["tokens"] <= long["tokens"] // 2
            state = ui.type_into("max_new_tokens", max_tokens, selector=".widget-readout")

            # temperature, typed: a sharper distribution, another sample from the same seed (the smoke
            # model's top-k scores are nearly flat, so raising the temperature changes little)
            colder = ui.type_into("temperature", "0.3", selector=".widget-readout")
            _changed(state, colder, "temperature")

            # prompt, typed key by key: one regeneration on Enter (committed() checks there is exactly one).
            # The spend is not asserted: the smoke model's continuation hardly depends on the prompt and
            # its frequent tokens share one cost, so a new prompt often spends exactly the same.
            prompt = ui.type_into("prompt", "Once upon a time")
            _changed(colder, prompt, "prompt", spend=False)
            assert prompt["text"].startswith("Once upon a time")

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            box = page.locator(".jp-OutputArea-output", has=page.locator(".metabolic-status")).last.bounding_box()
            # a margin around the output: the HTML widgets' text starts left of the output's box
            page.screenshot(path=SCREENSHOT, clip={"x": max(0, box["x"] - 90), "y": max(0, box["y"] - 10),
                                                   "width": box["width"] + 100, "height": box["height"] + 20})

            # budget, dragged to the bottom of its range: a smaller budget ends the text sooner
            low = ui.drag_slider("budget", 0.0)
            _changed(prompt, low, "budget")
            # the learned spend, and so the length, follows the budget; the true raw CSC of the smoke model's text need
            # not (raw totals are nearly flat in length: README, measured facts), so it is shown, not asserted
            assert low["budget"] < prompt["budget"] and low["tokens"] < prompt["tokens"], (prompt["status"], low["status"])

            browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
