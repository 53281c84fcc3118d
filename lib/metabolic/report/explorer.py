"""The live budget explorer (notebook 06): sliders for the budget, temperature, max tokens and the number
of verified candidates N, a seed box with a "resample" button, a prompt box, the generation with every
token coloured by its cost, and a gauge of what was spent against the budget. Each render is seeded by
the seed control, so moving any other control shows its effect on the same random draw.

Two modes. N = 0, **proxy**: budget-forced, steered generation on the learned costs (EOS held back until
the calibrated spend reaches the band's lower edge, then the budget stop), free of labels; when the
explorer has a labeller the shown text is then labelled once, so the gauge shows its *true* CSC (with
the labels and seconds that cost), never the proxy's share dressed as CSC. N >= 1, **verified**: the
verified controller (`metabolic.generate.verified`), exact by construction. Tokens are coloured by the
learned cost or by their labelled CSC (`colour_by`); hovering shows both. `render_levels` renders the
study's low / medium / high budgets side by side for one seed.

The logic is plain Python, testable without a browser: `BudgetExplorer.render(...)` returns an
`ExplorerView` (HTML strings and numbers) and `BudgetExplorer.refresh()` is the handler every widget
calls on change (`study_explorer(cfg)` builds one over a profile's artefacts). The handler never raises: any error (empty prompt, a prompt longer than the
context, a bad budget) is shown as one line in the output widget instead.
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from metabolic.core import artefacts
from metabolic.core.budget import ProxyCalibration, check_scale, in_band
from metabolic.core.config import StudyConfig
from metabolic.core.errors import ConfigError
from metabolic.evaluate.budgets import decoding_calibration, sampled_proxy_rate
from metabolic.evaluate.scoring import select_prompts
from metabolic.generate.budgeted import Generation, generate_with_budget, is_metabolic, model_token_costs
from metabolic.generate.verified import PrefixLabeller, generate_verified
from metabolic.pipeline import stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplorerView:
    """What the explorer shows for one set of inputs."""

    text_html: str  # prompt (grey) + generated tokens coloured by cost
    gauge_html: str  # spent vs budget bar
    status: str  # one line: tokens, spend, why it stopped, time; or the error
    spent_csc: float  # the true CSC of the shown text when labelled, else the proxy's share of the budget; NaN on error
    budget_csc: float  # the budget used (after clamping); NaN on error
    n_tokens: int
    error: str | None = None
    true_csc: float = math.nan  # the labeller's total for the shown text (NaN: not labelled)
    stopped_by: str = ""  # budget, sentence, eos, max_new_tokens (proxy); the verified outcome (verified)
    warning: str | None = None  # e.g. the text ended by EOS or the cap before the budget
    labels: int = 0  # encoder texts labelled for this view
    label_seconds: float = 0.0
    prompt_ids: tuple[int, ...] = ()
    generated_ids: tuple[int, ...] = ()


# What each stop reason means to a reader (proxy mode) and each stop kind of the verified controller.
STOP_WORDS = {"budget": "the budget", "sentence": "a sentence end within the band", "eos": "EOS",
              "max_new_tokens": "the token cap"}
STOP_KINDS = {"sentence": "a sentence end", "word": "a word end", "end": "the candidate's last token"}


def cost_colour(cost: float, low: float, high: float) -> str:
    """Background colour of a token: pale green (cheap, <= low) to red (dear, >= high)."""
    if not math.isfinite(cost):
        return "#dddddd"
    x = 0.0 if high <= low else min(1.0, max(0.0, (cost - low) / (high - low)))
    r = int(round(200 + 55 * x))
    g = int(round(240 - 150 * x))
    b = int(round(200 - 120 * x))
    return f"#{r:02x}{g:02x}{b:02x}"


def tokens_html(prompt: str, tokens: list[str], costs: list[float], low: float, high: float,
                csc: list[float] | None = None, colour_by: str = "learned", csc_high: float | None = None) -> str:
    """The prompt in grey, then one span per generated token coloured by its learned cost (or, with
    `colour_by="csc"` and labels, by its CSC on a 0..`csc_high` scale), both values in its tooltip."""
    parts = [f'<span style="color:#888">{html.escape(prompt)}</span>']
    by_csc = colour_by == "csc" and csc is not None
    top = csc_high if csc_high is not None else (max(csc) if csc else 1.0)
    for i, (tok, c) in enumerate(zip(tokens, costs)):
        title = f"cost {c:.4f}" + (f"; CSC {csc[i]:.4f}" if csc is not None else "")
        colour = cost_colour(csc[i], 0.0, top) if by_csc else cost_colour(c, low, high)
        parts.append(
            f'<span title="{title}" style="background:{colour};'
            f'border-radius:3px;padding:0 1px">{html.escape(tok)}</span>'
        )
    return '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">' + "".join(parts) + "</div>"


def spent_in_csc(spent_proxy: float, budget_proxy: float, budget_csc: float) -> float:
    """The proxy spend read in CSC as the share of the budget it has used: `B x spent / B_proxy`.

    Not the affine calibration of whole texts: with a negative intercept it reads a partial spend as
    negative CSC (smoke: 15 tokens, proxy 0.039 of 0.264, read -0.26). The share is what the controller
    steers and stops on; the true CSC of the text is the verified mode's.

    >>> spent_in_csc(0.066, 0.264, 0.459)
    0.11475
    """
    if not (math.isfinite(budget_proxy) and budget_proxy > 0):
        return math.nan
    return budget_csc * spent_proxy / budget_proxy


def gauge_html(spent: float, budget: float, band: float = 0.10, what: str = "CSC") -> str:
    """A horizontal bar: spent as a fraction of the budget, green within `band` of it (the Hit@10 band,
    `metabolic.core.budget.in_band`), orange below, red above (overspend shown beyond 100%); the band is
    shaded around the black 100% mark. `what` names what was spent (true CSC, or the proxy's share)."""
    valid = budget > 0 and math.isfinite(budget) and math.isfinite(spent)
    frac = spent / budget if valid else 0.0
    width = max(0.0, min(frac, 1.5)) / 1.5 * 100
    inside = bool(valid and in_band(spent, budget, band))
    colour = "#3a7" if inside else ("#e93" if frac < 1 else "#d33")
    verdict = "in band" if inside else ("below the band" if frac < 1 else "above the band")
    return (
        '<div style="width:320px;border:1px solid #999;height:16px;position:relative">'
        f'<div style="position:absolute;left:{100 * (1 - band) / 1.5:.1f}%;width:{100 * 2 * band / 1.5:.1f}%;height:100%;'
        'background:#cfe8d6"></div>'
        f'<div style="position:absolute;width:{width:.1f}%;height:100%;background:{colour};opacity:0.85"></div>'
        f'<div style="position:absolute;left:{100 / 1.5:.1f}%;top:-2px;height:20px;border-left:2px solid #000"></div>'
        f'</div><div style="font-size:12px">spent {spent:.3f} of {budget:.3f} {what} ({100 * frac:.0f}%): {verdict} '
        f'(±{100 * band:.0f}%: {budget * (1 - band):.3f} .. {budget * (1 + band):.3f})</div>'
    )


def _ids(ids) -> str:
    return ",".join(str(int(i)) for i in ids)


def _whole(value: Any, name: str) -> int:
    """`value` as an int when it is one (or a float without a fraction), else a `ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
        raise ConfigError(f"{name}={value!r} is invalid: use a whole number")
    return int(value)


def _first_line(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.info("explorer input rejected: %s", first)
    return first


def error_view(message: str) -> ExplorerView:
    text = f'<div style="color:#b00">error: {html.escape(message)}</div>'
    return ExplorerView(text_html=text, gauge_html="", status=f"error: {message}", spent_csc=float("nan"),
                        budget_csc=float("nan"), n_tokens=0, error=message)


class BudgetExplorer:
    """Budgeted generation behind widgets. `render` is the pure-ish core; `widget()` builds the UI.

    Args:
        model: a MetabolicGPT2 (its C_vocab and calibration are used) or a plain LM with `token_costs`
            and `calibration` given.
        budget_range: (low, high) CSC budgets the slider spans (the trained range on the trained scale); others are clamped.
        labeller: a `CSCLabeller`, needed for the verified mode (`candidates >= 1`) and for the true CSC of
            proxy-mode texts; `rate_hint` places the verified search's first probe (CSC per generated token).
        max_new_tokens: the token cap (default: what the context leaves after a short prompt); budget forcing
            and the budget stop decide where a text ends below it.
        proxy_rate: mean learned cost per generated token: paces steering over the tokens the budget needs.
        levels: the study's budget levels (name -> CSC), rendered side by side by `render_levels`.
        colour_by: "learned" (C_vocab) or "csc" (the labelled CSC of each token, when labelled).
        source: which model and run this is, in words: the widget's first line.
        scale: the CSC scale of budgets and true CSC ("raw", or "length": T x mean CSC, where a larger budget
            buys more text); `condition`: feed the budget to a MetabolicGPT-2's budget pathway (only on the
            scale it was trained on).
    """

    def __init__(self, model, tokenizer, budget_range: tuple[float, float], *, token_costs: Any = None,
                 calibration: ProxyCalibration | None = None, prompt: str = "The future of artificial intelligence",
                 budget: float | None = None, temperature: float = 1.0, max_new_tokens: int | None = None,
                 top_k: int = 50, steer: bool = True, seed: int = 0, labeller=None, candidates: int = 0,
                 rate_hint: float | None = None, proxy_rate: float | None = None,
                 levels: dict[str, float] | None = None, colour_by: str = "learned", band: float = 0.10,
                 source: str = "", scale: str = "raw", condition: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.token_costs = torch.as_tensor(token_costs, dtype=torch.float32) if token_costs is not None else model_token_costs(model)
        self.calibration = calibration if calibration is not None else model.proxy_calibration()
        lo, hi = float(budget_range[0]), float(budget_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ConfigError(f"budget_range={budget_range!r} is invalid: give (low, high) with 0 < low < high")
        self.budget_range = (lo, hi)
        self.prompt = prompt
        self.budget = float(budget) if budget is not None else (lo + hi) / 2
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else self._max_tokens_limit()
        self.top_k = top_k
        self.steer = steer
        self.seed = seed
        self.labeller = labeller
        self.candidates = int(candidates)
        self.rate_hint = rate_hint
        self.proxy_rate = proxy_rate
        self.levels = dict(levels or {})
        if colour_by not in ("learned", "csc"):
            raise ConfigError(f"colour_by={colour_by!r} is invalid: choose 'learned' or 'csc'")
        self.colour_by = colour_by
        self.band = float(band)
        self.source = source
        self.scale = check_scale(scale)
        self.condition = bool(condition)
        self._prefixes = PrefixLabeller(labeller) if labeller is not None else None  # one memo: a re-render labels nothing
        # Colour scale: the 5% and 95% quantiles of C_vocab, so typical tokens span the palette.
        q = torch.quantile(self.token_costs.double(), torch.tensor([0.05, 0.95], dtype=torch.float64))
        self.colour_low, self.colour_high = float(q[0]), float(q[1])
        self.renders = 0  # how many times the view was regenerated (the browser test reads it)
        self.last: ExplorerView | None = None
        self._widgets: dict[str, Any] | None = None

    def render(self, prompt: str, budget: float, temperature: float, max_new_tokens: int, *,
               candidates: int | None = None, seed: int | None = None) -> ExplorerView:
        """Generate for these inputs and return the view; any error becomes an error view, never a raise.

        `candidates` (default: the explorer's) >= 1 selects the verified controller; `seed` (default:
        the explorer's) seeds the sampling.
        """
        try:
            candidates = self.candidates if candidates is None else _whole(candidates, "candidates")
            seed = self.seed if seed is None else _whole(seed, "seed")
            max_new_tokens = _whole(max_new_tokens, "max_new_tokens")
        except ConfigError as exc:
            return error_view(_first_line(exc))
        if candidates >= 1:
            return self._render_verified(prompt, budget, temperature, max_new_tokens, candidates, seed)
        t0 = time.perf_counter()
        try:
            gens: list[Generation] = generate_with_budget(
                self.model, self.tokenizer, [prompt], float(budget), token_costs=self.token_costs,
                calibration=self.calibration, max_new_tokens=int(max_new_tokens), steer=self.steer, stop=True,
                force=True, band=self.band, proxy_rate=self.proxy_rate, do_sample=True, temperature=float(temperature),
                top_k=self.top_k, seed=seed, budget_range=self.budget_range, condition=self.condition,
            )
        except Exception as exc:  # noqa: BLE001 - the widget shows every failure as one line
            return error_view(_first_line(exc))
        g = gens[0]
        generated = time.perf_counter() - t0
        costs = self.token_costs[g.generated_ids].tolist() if g.generated_ids else []
        pieces = [self.tokenizer.decode([t]) for t in g.generated_ids]
        share = spent_in_csc(g.spent_proxy, g.budget_proxy, g.budget_csc) if g.generated_ids else 0.0
        per_token, true_csc, labels, label_s = self._label(g.prompt_ids, g.generated_ids)
        measured = math.isfinite(true_csc)
        spent = true_csc if measured else share
        inside = measured and bool(in_band(true_csc, g.budget_csc, self.band))
        warning = None
        if g.stopped_by in ("eos", "max_new_tokens") and not inside and (not measured or true_csc < g.budget_csc):
            warning = f"{STOP_WORDS[g.stopped_by]} ended the text before the budget was spent"
        measure = (f"true CSC {true_csc:.3f} of {g.budget_csc:.3f} ({'in band' if inside else 'outside the band'}; "
                   f"{labels} labels, {label_s:.2f} s)" if measured else f"budget {g.budget_csc:.3f} CSC (not labelled)")
        status = (f"seed {seed}: {len(pieces)} tokens, {measure}; learned spend {g.spent_proxy:.4f} of "
                  f"{g.budget_proxy:.4f} proxy units; stopped by {STOP_WORDS.get(g.stopped_by, g.stopped_by)}; "
                  f"{generated:.2f} s to generate")
        if warning:
            status += f"; warning: {warning}"
        if g.budget_csc != g.budget_requested_csc:
            status += f"; budget {g.budget_requested_csc:g} clamped to the slider's range"
        gauge = gauge_html(spent, g.budget_csc, self.band, "CSC (true)" if measured else "CSC (the learned spend's share)")
        return ExplorerView(
            text_html=self._tokens(prompt, pieces, costs, per_token, g.budget_csc), gauge_html=gauge, status=status,
            spent_csc=spent, budget_csc=g.budget_csc, n_tokens=len(pieces), true_csc=true_csc, stopped_by=g.stopped_by,
            warning=warning, labels=labels, label_seconds=label_s, prompt_ids=tuple(g.prompt_ids),
            generated_ids=tuple(g.generated_ids),
        )

    def _label(self, prompt_ids: list[int], generated_ids: list[int]) -> tuple[list[float] | None, float, int, float]:
        """(per-token CSC, total, encoder texts, seconds) of a shown text; (None, NaN, 0, 0) without a labeller."""
        if self._prefixes is None:
            return None, math.nan, 0, 0.0
        if not generated_ids:
            return [], 0.0, 0, 0.0
        t0 = time.perf_counter()
        (lab,), (spent,) = self._prefixes.labels([(prompt_ids, generated_ids)])
        (total,), _ = self._prefixes.totals([(prompt_ids, generated_ids)], self.scale)  # from the memo: free
        return [float(v) for v in lab], total, spent, time.perf_counter() - t0

    def _tokens(self, prompt: str, pieces: list[str], costs: list[float], per_token: list[float] | None,
                budget: float) -> str:
        # CSC colours run from 0 to twice the budget's average per token, so an even spend sits mid-scale
        top = 2 * budget / max(len(pieces), 1)
        return tokens_html(prompt, pieces, costs, self.colour_low, self.colour_high, per_token, self.colour_by, top)

    def _render_verified(self, prompt: str, budget: float, temperature: float, max_new_tokens: int, candidates: int,
                         seed: int) -> ExplorerView:
        t0 = time.perf_counter()
        try:
            if self.labeller is None:
                raise ValueError("the verified mode needs a labeller: BudgetExplorer(..., labeller=stages.csc_labeller(cfg))")
            (g,) = generate_verified(self.model, self.tokenizer, self.labeller, [prompt], float(budget),
                                     n_candidates=candidates, max_new_tokens=int(max_new_tokens), scale=self.scale,
                                     temperature=float(temperature), top_k=self.top_k, seed=seed, rate_hint=self.rate_hint,
                                     band=self.band, prefixes=self._prefixes)
        except Exception as exc:  # noqa: BLE001 - the widget shows every failure as one line
            return error_view(_first_line(exc))
        costs = self.token_costs[g.generated_ids].tolist() if g.generated_ids else []
        pieces = [self.tokenizer.decode([t]) for t in g.generated_ids]
        per_token, _, _, _ = self._label(g.prompt_ids, g.generated_ids)  # from the memo: the search labelled it
        status = (f"seed {seed}: {len(pieces)} tokens, true CSC {g.achieved_csc:.3f} of {g.budget_csc:.3f} ({g.status}); "
                  f"candidate {g.candidate + 1} of {candidates}, stopped at {STOP_KINDS.get(g.stop_kind, g.stop_kind)}, "
                  f"{g.labels} labels; {time.perf_counter() - t0:.2f} s")
        return ExplorerView(
            text_html=self._tokens(prompt, pieces, costs, per_token, g.budget_csc),
            gauge_html=gauge_html(g.achieved_csc, g.budget_csc, self.band, "CSC (true)"), status=status,
            spent_csc=g.achieved_csc, budget_csc=g.budget_csc, n_tokens=len(pieces), true_csc=g.achieved_csc,
            stopped_by=g.status, labels=g.labels, prompt_ids=tuple(g.prompt_ids), generated_ids=tuple(g.generated_ids),
        )

    def render_levels(self, prompt: str, temperature: float, max_new_tokens: int, *, candidates: int | None = None,
                      seed: int | None = None) -> dict[str, ExplorerView]:
        """One view per budget level of the study (`levels`), same prompt, seed and mode."""
        return {name: self.render(prompt, budget, temperature, max_new_tokens, candidates=candidates, seed=seed)
                for name, budget in self.levels.items()}

    def levels_html(self, views: dict[str, ExplorerView]) -> str:
        """The level views side by side: budget, text, gauge and status of each."""
        columns = "".join(
            f'<div style="flex:1;min-width:0;border:1px solid #ddd;padding:4px">'
            f"<b>{html.escape(name)}</b> (budget {v.budget_csc:.3f} CSC, {v.n_tokens} tokens)"
            f"{v.text_html}{v.gauge_html}<div style='font-size:11px;color:#555'>{html.escape(v.status)}</div></div>"
            for name, v in views.items())
        return f'<div class="metabolic-levels-view" style="display:flex;gap:6px">{columns}</div>'

    # --- widgets -------------------------------------------------------------------------------

    # Labels wide enough not to be cut off ("budget (CSC)" needs ~95 px at the default font); two sliders
    # share a row. Relative widths less each control's 2 px margins: a UI wider than its box scrolls sideways
    # (on focus) and hides its left edge.
    LABEL_WIDTH = "110px"
    SLIDER_WIDTH = "calc(50% - 4px)"
    VERIFIED_N = 8  # the mode switch's N: Table I's verified rows hit every level at N = 8 (results/budgets/cpu-*)

    def widget(self):
        """The ipywidgets UI. Every control regenerates once per committed change: sliders on release,
        the prompt and seed boxes on Enter (or leaving the box), "resample" moves to the next seed.

        Each control carries a CSS class `metabolic-<name>` (the browser test finds them by it)."""
        import ipywidgets as w

        lo, hi = self.budget_range
        style = {"description_width": self.LABEL_WIDTH}
        slider = {"continuous_update": False, "style": style, "layout": w.Layout(width=self.SLIDER_WIDTH)}
        controls = {
            # Text, not Textarea: with continuous_update=False it commits on Enter, not per keystroke.
            "prompt": w.Text(value=self.prompt, description="prompt", continuous_update=False, style=style,
                             layout=w.Layout(width="calc(100% - 4px)")),
            "budget": w.FloatSlider(value=self.budget, min=lo, max=hi, step=(hi - lo) / 1000, description="budget (CSC)",
                                    readout_format=".3f", **slider),
            "temperature": w.FloatSlider(value=self.temperature, min=0.1, max=2.0, step=0.05, description="temperature",
                                         **slider),
            "max_new_tokens": w.IntSlider(value=self.max_new_tokens, min=1, max=self._max_tokens_limit(),
                                          description="max tokens", **slider),
            "candidates": w.IntSlider(value=self.candidates, min=0, max=8, description="verified N",
                                      disabled=self.labeller is None, **slider),
            "seed": w.IntText(value=self.seed, description="seed", continuous_update=False, style=style,
                              layout=w.Layout(width="230px")),
        }
        # proxy (free, learned) or verified (labels, exact): a view of the N slider (0 = proxy), kept in step with it
        mode = w.ToggleButtons(options=[("proxy", "proxy"), ("verified", "verified")],
                               value="verified" if self.candidates else "proxy", description="mode", style=style,
                               tooltips=["the learned costs decide (free)", "N samples checked by the exact labeller"],
                               disabled=self.labeller is None, layout=w.Layout(width="330px"))
        controls["colour_by"] = w.Dropdown(options=[("learned cost", "learned"), ("true CSC (labelled)", "csc")],
                                           value=self.colour_by, description="colour by", style=style,
                                           disabled=self.labeller is None, layout=w.Layout(width="300px"))
        resample = w.Button(description="resample", tooltip="next seed: a new sample with the same settings",
                            layout=w.Layout(width="120px"))
        resample.on_click(self._on_resample)
        compare = w.Button(description="low / medium / high", tooltip="the study's three budget levels side by side",
                           disabled=not self.levels, layout=w.Layout(width="180px"))
        compare.on_click(self._on_compare)
        gauge, output, status, levels_view = w.HTML(), w.HTML(), w.HTML(), w.HTML()
        source = w.HTML(f'<span style="font-size:12px;color:#555">{html.escape(self.source)}</span>')
        parts = {**controls, "mode": mode, "resample": resample, "compare": compare, "gauge": gauge, "output": output,
                 "status": status, "levels": levels_view, "source": source}
        for name, widget in parts.items():
            widget.add_class(f"metabolic-{name}")
        self._widgets = parts
        for control in controls.values():
            control.observe(self._on_change, names="value")
        mode.observe(self._on_mode, names="value")
        self.refresh()
        row = w.Layout(width="100%")
        return w.VBox([source, controls["prompt"], w.HBox([controls["budget"], controls["temperature"]], layout=row),
                       w.HBox([controls["max_new_tokens"], controls["candidates"]], layout=row),
                       w.HBox([controls["seed"], resample, mode]), w.HBox([controls["colour_by"], compare]), gauge, output, status,
                       levels_view], layout=w.Layout(width="100%", max_width="1000px"))

    def _on_compare(self, _button) -> None:
        ws = self._widgets
        ws["levels"].value = '<span style="font-size:12px">generating the three levels…</span>'
        views = self.render_levels(ws["prompt"].value, ws["temperature"].value, ws["max_new_tokens"].value,
                                   candidates=ws["candidates"].value, seed=ws["seed"].value)
        ws["levels"].value = self.levels_html(views)

    def _on_mode(self, change) -> None:
        """The mode switch moves the N slider (which regenerates once): verified starts at `VERIFIED_N`."""
        n = self._widgets["candidates"]
        if change["new"] == "verified" and n.value == 0:
            n.value = self.VERIFIED_N
        elif change["new"] == "proxy" and n.value != 0:
            n.value = 0

    def _on_resample(self, _button) -> None:
        self._widgets["seed"].value = int(self._widgets["seed"].value) + 1  # observed: regenerates once

    def _max_tokens_limit(self) -> int:
        lm = self.model.backbone if is_metabolic(self.model) else self.model
        n_pos = getattr(lm.config, "n_positions", 1024)
        return max(1, min(256, n_pos - 8))

    def _on_change(self, change) -> None:
        self.refresh()

    def refresh(self) -> ExplorerView:
        """Read the controls (or the stored values without widgets), regenerate and update the view."""
        ws = self._widgets
        if ws is not None:
            self.prompt = ws["prompt"].value
            self.budget = ws["budget"].value
            self.temperature = ws["temperature"].value
            self.max_new_tokens = ws["max_new_tokens"].value
            self.candidates = ws["candidates"].value
            self.seed = ws["seed"].value
            self.colour_by = ws["colour_by"].value
            wanted = "verified" if self.candidates else "proxy"
            if ws["mode"].value != wanted:
                ws["mode"].value = wanted  # the N slider moved past 0: the switch follows (no second render)
            # a busy sign while it works (the verified mode labels for seconds)
            mode = f"verified N={self.candidates}: sampling and labelling" if self.candidates else "generating"
            ws["status"].value = f'<span style="font-size:12px;color:#777">{mode}…</span>'
        view = self.render(self.prompt, self.budget, self.temperature, self.max_new_tokens)
        self.renders += 1
        self.last = view
        if ws is not None:
            ws["output"].value = view.text_html
            ws["gauge"].value = view.gauge_html
            # the shown text's token ids ride along, so a test can label it independently of the explorer
            ids = f'data-prompt-ids="{_ids(view.prompt_ids)}" data-generated-ids="{_ids(view.generated_ids)}"'
            ws["status"].value = (f'<span data-renders="{self.renders}" {ids} style="font-size:12px">'
                                  f"render #{self.renders}: {html.escape(view.status)}</span>")
        return view


@dataclass(frozen=True)
class StudyExplorer:
    """Notebook 06's explorer over a profile's artefacts, with the budget levels and calibration it uses."""

    explorer: BudgetExplorer
    levels: dict[str, float]  # the evaluated budget levels (CSC), as in notebook 04
    calibration_note: str  # how the budget -> proxy map was made


def study_explorer(cfg: StudyConfig, variant: str = "expected-cost", reuse_only: bool = False,
                   scale: str | None = None) -> StudyExplorer:
    """The explorer for `variant` of `cfg`'s profile, building any missing artefact (backbone, CSC
    labels, the trained variant) the way every stage does; with `reuse_only`, a missing or stale one is a
    `StaleArtefactError` instead (a run found on disk is shown as it is, never rebuilt for an hour).

    Budgets (on `scale`, default `csc.scale`), their range and the budget -> proxy map are notebook 04's:
    on `csc.scale` its proxy decodings', on the other scale its verified rows' (the same quantiles of that
    scale's training continuations; the budget pathway, trained on `csc.scale`, is then left off). The
    verified mode labels candidates with the exact CSC labeller."""
    with artefacts.reuse_only() if reuse_only else contextlib.nullcontext():
        return _study_explorer(cfg, variant, check_scale(scale or cfg.csc.scale))


def _study_explorer(cfg: StudyConfig, variant: str, scale: str) -> StudyExplorer:
    g = cfg.generation
    tokenizer = stages.corpus(cfg).tokenizer
    model = stages.train_metabolic(cfg, variant).load_best(device="cpu")
    csc = stages.csc_labels(cfg)
    levels = stages.budget_levels(cfg, csc)
    targets, rate_hints = stages.verified_targets(csc, cfg, levels.budgets, (scale,))
    # the slider's range on `scale` (the levels above already hold it on the evaluation's own scale)
    budget_range = (levels if scale == cfg.csc.scale else stages.budget_levels(cfg, csc, scale)).budget_range
    budgets = list(targets[scale].values())
    calibration, how = decoding_calibration(model, g, scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc, budgets)
    # the token cap's proxy rate: the model's own unbudgeted samples of the evaluation's prompts, as notebook 04's
    unbudgeted = generate_with_budget(model, tokenizer, select_prompts(g, tokenizer, csc.valid_ids), math.inf, steer=False,
                                      stop=False, force=False, max_new_tokens=g.max_new_tokens, calibration=calibration,
                                      temperature=g.temperature, top_k=g.top_k, seed=g.seed)
    on = "" if scale == "raw" else ", budgets and true CSC on the length-aware scale (T x mean CSC per token)"
    explorer = BudgetExplorer(model, tokenizer, budget_range, calibration=calibration, prompt=g.prompts[0],
                              budget=budgets[len(budgets) // 2], temperature=g.temperature, top_k=g.top_k, seed=g.seed,
                              labeller=stages.csc_labeller(cfg), rate_hint=rate_hints[scale],
                              proxy_rate=sampled_proxy_rate(unbudgeted), levels=targets[scale], band=g.verified_band,
                              scale=scale, condition=scale == cfg.csc.scale,
                              source=f"the {variant} model of the {cfg.profile} run "
                                     f"({artefacts.shown(artefacts.run_dir(cfg.run_name))}){on}")
    return StudyExplorer(explorer, dict(targets[scale]), how)
