"""The budget explorer's logic, without a browser: render, error views, widget handlers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.budget import ProxyCalibration
from metabolic.report.explorer import BudgetExplorer, cost_colour, gauge_html, spent_in_csc
from tiny_lm import tiny_gpt2, token_costs


@pytest.fixture(scope="module")
def explorer(tokenizer):
    model = tiny_gpt2(tokenizer)
    return BudgetExplorer(model, tokenizer, (0.5, 3.0), token_costs=token_costs(len(tokenizer)),
                          calibration=ProxyCalibration(0.1, 1.0), max_new_tokens=12)


def test_render_colours_every_generated_token(explorer):
    view = explorer.render("The history of the city", 1.0, 1.0, 12)
    assert view.error is None
    assert 1 <= view.n_tokens <= 12
    assert view.text_html.count('title="cost ') == view.n_tokens
    assert view.budget_csc == 1.0
    assert "spent" in view.gauge_html and math.isfinite(view.spent_csc)
    # the same inputs give the same text (seeded)
    assert explorer.render("The history of the city", 1.0, 1.0, 12).text_html == view.text_html


def test_out_of_range_budget_is_clamped_and_said(explorer):
    view = explorer.render("Hello", 50.0, 1.0, 8)
    assert view.error is None and view.budget_csc == 3.0
    assert "clamped" in view.status


@pytest.mark.parametrize(
    "prompt, budget, temperature, max_tokens, message",
    [
        ("", 1.0, 1.0, 8, "empty"),
        ("   ", 1.0, 1.0, 8, "empty"),
        ("Hello", 0.0, 1.0, 8, "budget"),
        ("Hello", float("nan"), 1.0, 8, "NaN"),
        ("Hello", 1.0, 0.0, 8, "temperature"),
        ("Hello", 1.0, 1.0, 0, "max_new_tokens"),
        ("word " * 60, 1.0, 1.0, 8, "context"),
    ],
)
def test_bad_input_shows_an_error_and_never_raises(explorer, prompt, budget, temperature, max_tokens, message):
    view = explorer.render(prompt, budget, temperature, max_tokens)
    assert view.error is not None and message in view.error
    assert view.n_tokens == 0 and "error:" in view.text_html


def test_moving_the_slider_regenerates(explorer):
    pytest.importorskip("ipywidgets")
    ui = explorer.widget()
    assert ui is not None
    ws = explorer._widgets
    first = explorer.renders
    ws["budget"].value = 2.5
    assert explorer.renders == first + 1
    assert explorer.last.budget_csc == 2.5 and explorer.last.error is None
    assert ws["output"].value == explorer.last.text_html and ws["gauge"].value == explorer.last.gauge_html
    assert ws["status"].value.count(f'data-renders="{first + 1}"') == 1
    ws["prompt"].value = ""
    assert explorer.renders == first + 2
    assert ws["output"].value == explorer.last.text_html and "error:" in ws["output"].value  # shown, not raised
    ws["prompt"].value = "The history of the city"
    # regenerated from the widgets' values: the same text as rendering those inputs directly (seeded), no error left
    assert explorer.renders == first + 3 and explorer.last.error is None
    expected = explorer.render("The history of the city", 2.5, ws["temperature"].value, ws["max_new_tokens"].value)
    assert ws["output"].value == expected.text_html and "error:" not in ws["output"].value
    assert ws["status"].value.count(f'data-renders="{first + 3}"') == 1


def test_seed_and_resample_regenerate_once_each(explorer):
    pytest.importorskip("ipywidgets")
    explorer.widget()
    ws = explorer._widgets
    ws["max_new_tokens"].value = 12
    seed, renders = ws["seed"].value, explorer.renders
    ws["resample"].click()
    assert (ws["seed"].value, explorer.renders) == (seed + 1, renders + 1)
    assert f"seed {seed + 1}:" in explorer.last.status
    resampled = explorer.last
    ws["seed"].value = seed  # the same seed gives the same sample back
    assert explorer.renders == renders + 2 and f"seed {seed}:" in explorer.last.status
    assert explorer.render(ws["prompt"].value, ws["budget"].value, ws["temperature"].value, 12,
                           seed=seed + 1).text_html == resampled.text_html
    ws["max_new_tokens"].value = 2
    assert explorer.renders == renders + 3 and explorer.last.n_tokens <= 2


def test_colours_and_gauge_are_bounded():
    assert cost_colour(-5, 0, 1) == cost_colour(0, 0, 1)
    assert cost_colour(9, 0, 1) == cost_colour(1, 0, 1)
    assert cost_colour(float("nan"), 0, 1) == "#dddddd"
    assert "(100%)" in gauge_html(2.0, 2.0) and "(0%)" in gauge_html(0.0, 2.0)


def test_verified_n_switches_to_the_verified_controller(tokenizer, assets_dir):
    pytest.importorskip("ipywidgets")
    from metabolic.core.assets import load_encoder
    from metabolic.csc.labeller import CSCLabeller

    labeller = CSCLabeller(load_encoder("sentence-transformers/all-MiniLM-L6-v2").value, tokenizer, batch_size=64)
    explorer = BudgetExplorer(tiny_gpt2(tokenizer, n_positions=64), tokenizer, (0.05, 0.5), token_costs=token_costs(len(tokenizer)),
                              calibration=ProxyCalibration(0.1, 1.0), max_new_tokens=8, labeller=labeller, rate_hint=0.02)
    explorer.widget()
    ws, renders = explorer._widgets, explorer.renders
    assert not ws["candidates"].disabled and "candidate" not in explorer.last.status
    ws["candidates"].value = 2
    assert explorer.renders == renders + 1 and explorer.last.error is None
    assert "true CSC" in explorer.last.status and "of 2, stopped at" in explorer.last.status
    assert math.isfinite(explorer.last.spent_csc) and explorer.last.budget_csc == ws["budget"].value


@given(share=st.floats(0.0, 1.0), budget_proxy=st.floats(1e-4, 10.0), budget_csc=st.floats(1e-3, 10.0))
def test_spend_reads_as_its_share_of_the_budget_never_below_zero(share, budget_proxy, budget_csc):
    spent = spent_in_csc(share * budget_proxy, budget_proxy, budget_csc)
    assert 0.0 <= spent <= budget_csc * (1 + 1e-12)
    assert spent == pytest.approx(share * budget_csc, rel=1e-9, abs=1e-15)


def test_spend_under_an_unlimited_or_empty_budget_is_nan():
    assert math.isnan(spent_in_csc(0.1, math.inf, math.inf)) and math.isnan(spent_in_csc(0.1, 0.0, 0.5))


@pytest.fixture(scope="module")
def labelled(tokenizer, assets_dir):
    """An explorer with a labeller and three budget levels (the study's setting, on a tiny model)."""
    from metabolic.core.assets import load_encoder
    from metabolic.csc.labeller import CSCLabeller

    labeller = CSCLabeller(load_encoder("sentence-transformers/all-MiniLM-L6-v2").value, tokenizer, batch_size=64)
    costs = token_costs(len(tokenizer))
    explorer = BudgetExplorer(tiny_gpt2(tokenizer, n_positions=64), tokenizer, (0.5, 4.0), token_costs=costs,
                              calibration=ProxyCalibration(0.0, 1.0), labeller=labeller, rate_hint=0.02,
                              proxy_rate=float(costs.mean()), levels={"low": 1.0, "medium": 2.0, "high": 3.0})
    return explorer, labeller


def test_proxy_mode_shows_the_labellers_true_csc(labelled):
    explorer, labeller = labelled
    view = explorer.render("The history of the city", 2.0, 1.0, 40)
    assert view.error is None and view.n_tokens == len(view.generated_ids) > 0
    truth = labeller.label_generated([list(view.prompt_ids)], [list(view.generated_ids)])[0].astype("float64").sum()
    assert view.true_csc == pytest.approx(truth, abs=1e-6) and view.spent_csc == view.true_csc
    assert view.labels == view.n_tokens + 1  # the text and one counterfactual per generated token
    assert "CSC (true)" in view.gauge_html and f"true CSC {view.true_csc:.3f} of 2.000" in view.status
    assert view.stopped_by in ("budget", "sentence", "eos", "max_new_tokens")
    assert view.text_html.count("; CSC ") == view.n_tokens  # hover shows the learned cost and the CSC
    again = explorer.render("The history of the city", 2.0, 1.0, 40)
    assert again.generated_ids == view.generated_ids and again.labels == 0  # the same text is not labelled twice


def test_levels_side_by_side_grow_with_the_budget(labelled):
    explorer, _ = labelled
    views = explorer.render_levels("The history of the city", 1.0, 56, seed=3)
    tokens = [v.n_tokens for v in views.values()]
    assert list(views) == ["low", "medium", "high"] and tokens[0] < tokens[1] < tokens[2], tokens
    # budget forcing: no text ends by EOS before the calibrated spend reaches the band's lower edge
    assert all(v.warning is None or "cap" in v.warning for v in views.values()), [v.status for v in views.values()]
    page = explorer.levels_html(views)
    assert page.count("<b>") == 3 and all(f"{n} tokens)" in page for n in tokens)
    verified = explorer.render_levels("The history of the city", 1.0, 56, candidates=4, seed=3)
    assert all(v.error is None and v.stopped_by in ("in band", "closest below", "closest above", "unreachable below",
                                                     "unreachable above") for v in verified.values())


def test_colour_by_csc_colours_by_the_labels(labelled):
    explorer, _ = labelled
    explorer.colour_by = "csc"
    try:
        by_csc = explorer.render("The history of the city", 2.0, 1.0, 40)
    finally:
        explorer.colour_by = "learned"
    by_cost = explorer.render("The history of the city", 2.0, 1.0, 40)
    assert by_csc.generated_ids == by_cost.generated_ids and by_csc.text_html != by_cost.text_html
    with pytest.raises(ValueError, match="colour_by"):
        BudgetExplorer(explorer.model, explorer.tokenizer, (0.5, 4.0), token_costs=explorer.token_costs,
                       calibration=explorer.calibration, colour_by="rainbow")


@pytest.mark.parametrize("budget_range", [(0.0, 0.0), (float("nan"), 1.0), (2.0, 1.0)])
def test_a_bad_budget_range_is_a_config_error(tokenizer, budget_range):
    from metabolic.core.errors import ConfigError

    with pytest.raises(ConfigError, match="budget_range=.* is invalid: give \\(low, high\\)"):
        BudgetExplorer(tiny_gpt2(tokenizer), tokenizer, budget_range, token_costs=token_costs(len(tokenizer)),
                       calibration=ProxyCalibration(0.1, 1.0))


@pytest.mark.parametrize("kwargs, message", [(dict(seed="x"), "seed='x'"), (dict(candidates=1.5), "candidates=1.5"),
                                             (dict(temperature=0.0), "temperature=0.0")])
def test_render_never_raises(explorer, kwargs, message):
    args = dict(prompt="Hi", budget=1.0, temperature=1.0, max_new_tokens=4)
    args.update(kwargs)
    view = explorer.render(**args)
    assert view.error is not None and message in view.error and view.n_tokens == 0


def test_the_mode_switch_moves_n_and_follows_it(labelled):
    pytest.importorskip("ipywidgets")
    explorer, _ = labelled
    explorer.widget()
    ws, renders = explorer._widgets, explorer.renders
    assert ws["mode"].value == "proxy" and ws["candidates"].value == 0
    ws["mode"].value = "verified"  # one click: verified with N = 8 (Table I's), one regeneration
    assert explorer.VERIFIED_N == 8
    assert ws["candidates"].value == 8 and explorer.renders == renders + 1 and "of 8, stopped at" in explorer.last.status
    ws["candidates"].value = 0  # the slider back to 0: the switch follows, still one regeneration
    assert ws["mode"].value == "proxy" and explorer.renders == renders + 2 and "candidate" not in explorer.last.status


def test_the_strongest_run_is_a_finished_cpu_run_made_by_this_code(tmp_path, monkeypatch):
    from metabolic import __version__
    from metabolic.core import artefacts
    from metabolic.core.profiles import load_config
    from metabolic.report.notebook import strongest_profile

    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path))
    assert strongest_profile("cpu") == ("cpu", "as asked")
    profile, why = strongest_profile("strongest")
    assert profile == "smoke" and "no finished cpu run" in why
    folder = tmp_path / "cpu" / "evaluation"

    def write(work):
        (work / "tables.json").write_text("{}")

    artefacts.build_artefact(folder, {"stage": "evaluate"}, write, load_config("cpu", {"train.epochs": 7}).to_json())
    profile, why = strongest_profile("strongest")
    assert profile == "smoke" and "made by other code or settings" in why  # the cpu profile's settings changed
    artefacts.build_artefact(folder, {"stage": "evaluate", "again": 1}, write, load_config("cpu").to_json())
    assert strongest_profile("strongest") == ("cpu", f"the strongest finished run on disk ({tmp_path / 'cpu'})")
    manifest = json.loads((folder / artefacts.MANIFEST).read_text())
    manifest["description"]["library_version"] = __version__ + ".old"
    (folder / artefacts.MANIFEST).write_text(json.dumps(manifest))
    assert strongest_profile("strongest")[0] == "smoke"
