"""The live budget explorer (notebook 06): sliders for the budget, temperature, max tokens and the number
of verified candidates N, a seed box with a "resample" button, a prompt box, the generation with every
token coloured by its cost, and a gauge of spent vs budget. Each render is seeded by the seed control,
so moving any other control shows its effect on the same random draw. N = 0 runs steered generation (the learned proxy, calibrated
spend); N >= 1 runs the verified controller (`metabolic.generate.verified`: the true CSC, labelled).

The logic is plain Python, testable without a browser: `BudgetExplorer.render(...)` returns an
`ExplorerView` (HTML strings and numbers) and `BudgetExplorer.refresh()` is the handler every widget
calls on change (`study_explorer(cfg)` builds one over a profile's artefacts). The handler never raises: any error (empty prompt, a prompt longer than the
context, a bad budget) is shown as one line in the output widget instead.
"""

from __future__ import annotations

import html
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from metabolic.core.budget import ProxyCalibration, in_band
from metabolic.core.config import StudyConfig
from metabolic.evaluate.budgets import decoding_calibration
from metabolic.generate.budgeted import Generation, generate_with_budget, is_metabolic, model_token_costs
from metabolic.generate.verified import generate_verified
from metabolic.pipeline import stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplorerView:
    """What the explorer shows for one set of inputs."""

    text_html: str  # prompt (grey) + generated tokens coloured by cost
    gauge_html: str  # spent vs budget bar
    status: str  # one line: tokens, spend, why it stopped, time; or the error
    spent_csc: float  # calibrated spend (CSC units); NaN on error
    budget_csc: float  # the budget used (after clamping); NaN on error
    n_tokens: int
    error: str | None = None


def cost_colour(cost: float, low: float, high: float) -> str:
    """Background colour of a token: pale green (cheap, <= low) to red (dear, >= high)."""
    if not math.isfinite(cost):
        return "#dddddd"
    x = 0.0 if high <= low else min(1.0, max(0.0, (cost - low) / (high - low)))
    r = int(round(200 + 55 * x))
    g = int(round(240 - 150 * x))
    b = int(round(200 - 120 * x))
    return f"#{r:02x}{g:02x}{b:02x}"


def tokens_html(prompt: str, tokens: list[str], costs: list[float], low: float, high: float) -> str:
    """The prompt in grey, then one span per generated token, coloured by cost, its cost as a tooltip."""
    parts = [f'<span style="color:#888">{html.escape(prompt)}</span>']
    for tok, c in zip(tokens, costs):
        parts.append(
            f'<span title="cost {c:.4f}" style="background:{cost_colour(c, low, high)};'
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


def gauge_html(spent: float, budget: float, band: float = 0.10) -> str:
    """A horizontal bar: spent as a fraction of the budget, green within `band` of it (the Hit@10 band,
    `metabolic.core.budget.in_band`), orange below, red above (overspend shown beyond 100%)."""
    valid = budget > 0 and math.isfinite(budget) and math.isfinite(spent)
    frac = spent / budget if valid else 0.0
    width = max(0.0, min(frac, 1.5)) / 1.5 * 100
    colour = "#3a7" if valid and in_band(spent, budget, band) else ("#e93" if frac < 1 else "#d33")
    return (
        '<div style="width:320px;border:1px solid #999;height:16px;position:relative">'
        f'<div style="width:{width:.1f}%;height:100%;background:{colour}"></div>'
        f'<div style="position:absolute;left:{100 / 1.5:.1f}%;top:-2px;height:20px;border-left:2px solid #000"></div>'
        f'</div><div style="font-size:12px">spent {spent:.3f} of {budget:.3f} CSC ({100 * frac:.0f}%)</div>'
    )


def error_view(message: str) -> ExplorerView:
    text = f'<div style="color:#b00">error: {html.escape(message)}</div>'
    return ExplorerView(text_html=text, gauge_html="", status=f"error: {message}", spent_csc=float("nan"),
                        budget_csc=float("nan"), n_tokens=0, error=message)


class BudgetExplorer:
    """Budgeted generation behind widgets. `render` is the pure-ish core; `widget()` builds the UI.

    Args:
        model: a MetabolicGPT2 (its C_vocab and calibration are used) or a plain LM with `token_costs`
            and `calibration` given.
        budget_range: (low, high) CSC budgets the slider spans (the trained range); others are clamped.
        labeller: a `CSCLabeller`, needed for the verified mode (`candidates >= 1`); `rate_hint` places
            its first probe (CSC per generated token).
    """

    def __init__(self, model, tokenizer, budget_range: tuple[float, float], *, token_costs: Any = None,
                 calibration: ProxyCalibration | None = None, prompt: str = "The future of artificial intelligence",
                 budget: float | None = None, temperature: float = 1.0, max_new_tokens: int = 48, top_k: int = 50,
                 steer: bool = True, seed: int = 0, labeller=None, candidates: int = 0,
                 rate_hint: float | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.token_costs = torch.as_tensor(token_costs, dtype=torch.float32) if token_costs is not None else model_token_costs(model)
        self.calibration = calibration if calibration is not None else model.proxy_calibration()
        lo, hi = float(budget_range[0]), float(budget_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"budget_range={budget_range!r} is invalid: give (low, high) with 0 < low < high")
        self.budget_range = (lo, hi)
        self.prompt = prompt
        self.budget = float(budget) if budget is not None else (lo + hi) / 2
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.top_k = top_k
        self.steer = steer
        self.seed = seed
        self.labeller = labeller
        self.candidates = int(candidates)
        self.rate_hint = rate_hint
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
        candidates = self.candidates if candidates is None else int(candidates)
        seed = self.seed if seed is None else int(seed)
        if candidates >= 1:
            return self._render_verified(prompt, budget, temperature, max_new_tokens, candidates, seed)
        t0 = time.perf_counter()
        try:
            gens: list[Generation] = generate_with_budget(
                self.model, self.tokenizer, [prompt], float(budget), token_costs=self.token_costs,
                calibration=self.calibration, max_new_tokens=int(max_new_tokens), steer=self.steer, stop=True,
                do_sample=True, temperature=float(temperature), top_k=self.top_k, seed=seed,
                budget_range=self.budget_range,
            )
        except Exception as exc:  # noqa: BLE001 - the widget shows every failure as one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.info("explorer input rejected: %s", first)
            return error_view(first)
        g = gens[0]
        costs = self.token_costs[g.generated_ids].tolist() if g.generated_ids else []
        pieces = [self.tokenizer.decode([t]) for t in g.generated_ids]
        spent_csc = spent_in_csc(g.spent_proxy, g.budget_proxy, g.budget_csc) if g.generated_ids else 0.0
        elapsed = time.perf_counter() - t0
        status = (f"seed {seed}: {len(pieces)} tokens, spent {spent_csc:.3f} of {g.budget_csc:.3f} CSC "
                  f"(proxy {g.spent_proxy:.3f} of {g.budget_proxy:.3f}); stopped by {g.stopped_by}; {elapsed:.2f} s")
        if g.budget_csc != g.budget_requested_csc:
            status += f"; budget {g.budget_requested_csc:g} clamped to the trained range"
        return ExplorerView(
            text_html=tokens_html(prompt, pieces, costs, self.colour_low, self.colour_high),
            gauge_html=gauge_html(spent_csc, g.budget_csc), status=status, spent_csc=spent_csc,
            budget_csc=g.budget_csc, n_tokens=len(pieces),
        )

    def _render_verified(self, prompt: str, budget: float, temperature: float, max_new_tokens: int, candidates: int,
                         seed: int) -> ExplorerView:
        t0 = time.perf_counter()
        try:
            if self.labeller is None:
                raise ValueError("the verified mode needs a labeller: BudgetExplorer(..., labeller=stages.csc_labeller(cfg))")
            (g,) = generate_verified(self.model, self.tokenizer, self.labeller, [prompt], float(budget),
                                     n_candidates=candidates, max_new_tokens=int(max_new_tokens),
                                     temperature=float(temperature), top_k=self.top_k, seed=seed, rate_hint=self.rate_hint)
        except Exception as exc:  # noqa: BLE001 - the widget shows every failure as one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.info("explorer input rejected: %s", first)
            return error_view(first)
        costs = self.token_costs[g.generated_ids].tolist() if g.generated_ids else []
        pieces = [self.tokenizer.decode([t]) for t in g.generated_ids]
        status = (f"seed {seed}: {len(pieces)} tokens, true CSC {g.achieved_csc:.3f} of {g.budget_csc:.3f} ({g.status}); "
                  f"candidate {g.candidate + 1} of {candidates}, stop at a {g.stop_kind} end, "
                  f"{g.labels} labels; {time.perf_counter() - t0:.2f} s")
        return ExplorerView(
            text_html=tokens_html(prompt, pieces, costs, self.colour_low, self.colour_high),
            gauge_html=gauge_html(g.achieved_csc, g.budget_csc), status=status, spent_csc=g.achieved_csc,
            budget_csc=g.budget_csc, n_tokens=len(pieces),
        )

    # --- widgets -------------------------------------------------------------------------------

    # Labels wide enough not to be cut off ("budget (CSC)" needs ~95 px at the default font); two sliders
    # share a row. Relative widths less each control's 2 px margins: a UI wider than its box scrolls sideways
    # (on focus) and hides its left edge.
    LABEL_WIDTH = "110px"
    SLIDER_WIDTH = "calc(50% - 4px)"

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
            "budget": w.FloatSlider(value=self.budget, min=lo, max=hi, step=(hi - lo) / 100, description="budget (CSC)",
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
        resample = w.Button(description="resample", tooltip="next seed: a new sample with the same settings",
                            layout=w.Layout(width="120px"))
        resample.on_click(self._on_resample)
        gauge, output, status = w.HTML(), w.HTML(), w.HTML()
        for name, widget in {**controls, "resample": resample, "gauge": gauge, "output": output, "status": status}.items():
            widget.add_class(f"metabolic-{name}")
        self._widgets = {**controls, "resample": resample, "gauge": gauge, "output": output, "status": status}
        for control in controls.values():
            control.observe(self._on_change, names="value")
        self.refresh()
        row = w.Layout(width="100%")
        return w.VBox([controls["prompt"], w.HBox([controls["budget"], controls["temperature"]], layout=row),
                       w.HBox([controls["max_new_tokens"], controls["candidates"]], layout=row),
                       w.HBox([controls["seed"], resample]), gauge, output, status], layout=w.Layout(width="100%", max_width="1000px"))

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
        view = self.render(self.prompt, self.budget, self.temperature, self.max_new_tokens)
        self.renders += 1
        self.last = view
        if ws is not None:
            ws["output"].value = view.text_html
            ws["gauge"].value = view.gauge_html
            ws["status"].value = (f'<span data-renders="{self.renders}" style="font-size:12px">'
                                  f"render #{self.renders}: {html.escape(view.status)}</span>")
        return view


@dataclass(frozen=True)
class StudyExplorer:
    """Notebook 06's explorer over a profile's artefacts, with the budget levels and calibration it uses."""

    explorer: BudgetExplorer
    levels: dict[str, float]  # the evaluated budget levels (CSC), as in notebook 04
    calibration_note: str  # how the budget -> proxy map was made


def study_explorer(cfg: StudyConfig, variant: str = "expected-cost") -> StudyExplorer:
    """The explorer for `variant` of `cfg`'s profile, building any missing artefact (backbone, CSC
    labels, the trained variant) the way every stage does. Budgets, their range and the budget -> proxy
    map are notebook 04's; the verified mode labels candidates with the exact CSC labeller."""
    g = cfg.generation
    tokenizer = stages.corpus(cfg).tokenizer
    model = stages.train_metabolic(cfg, variant).load_best(device="cpu")
    csc = stages.csc_labels(cfg)
    levels = stages.budget_levels(cfg, csc)
    budgets = list(levels.budgets.values())
    calibration, how = decoding_calibration(model, g, cfg.csc.scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                          budgets)
    _, rate_hints = stages.verified_targets(csc, cfg, levels.budgets)
    explorer = BudgetExplorer(model, tokenizer, levels.budget_range, calibration=calibration, prompt=g.prompts[0],
                              budget=budgets[len(budgets) // 2], temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                              top_k=g.top_k, seed=g.seed, labeller=stages.csc_labeller(cfg),
                              rate_hint=rate_hints.get(cfg.csc.scale))
    return StudyExplorer(explorer, dict(levels.budgets), how)
