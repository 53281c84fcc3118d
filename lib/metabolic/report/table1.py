"""Notebook 04's tables and conclusions, read from the evaluate stage's `tables.json` (`combined`).

Every number printed comes from the combined dict; nothing here recomputes an evaluation. Tables
are grouped by kind: the proxy decodings of the trained variants (`model_tables`), the verified
controller (`verified`), the label-free baselines on its candidates (`baselines`), and the stop rules
on fixed held-out text (`combined["stop_rules"]`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from metabolic.core.budget import LEVELS
from metabolic.evaluate.scoring import BUDGET_STOPS, PAPER_TABLE1
from metabolic.generate.budgeted import TOKEN_CAP_HEADROOM
from metabolic.report import gpu_results

STOP_REASONS = ("budget", "sentence", "eos", "max_new_tokens")  # why a proxy decoding ended, in that order
TABLE_I_COLUMNS = ["Budget", "MAE", "MAPE", "Hit@10", "Hit@20", "Hit@50", "Achieved", "Target"]  # the paper's columns


def tables_of(combined: dict[str, Any], variant: str) -> dict[str, dict[str, Any]]:
    """The tables of one kind: "verified", "baseline", or "model" (both trained variants' proxy decodings)."""
    if variant == "model":
        return {k: t for k, t in combined["tables"].items() if t["variant"] not in ("verified", "baseline")}
    return {k: t for k, t in combined["tables"].items() if t["variant"] == variant}


def in_level_order(values: dict[str, Any]) -> dict[str, Any]:
    """`values` keyed by budget level, low to high (JSON files store their keys sorted: high, low, medium)."""
    rank = {level: i for i, level in enumerate(LEVELS)}
    return dict(sorted(values.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def scales(combined: dict[str, Any]) -> list[str]:
    """The CSC scales the evaluation's tables are scored on, sorted."""
    return sorted({t["csc_scale"] for t in combined["tables"].values()})


def is_steered_verified(table: dict[str, Any]) -> bool:
    """Whether a verified table's candidates were sampled under cost steering."""
    return table["decoding"] == "verified_steered"


def _rounded(values: dict[str, float], digits: int = 4) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


def budget_lines(combined: dict[str, Any], scale: str, n_records: int) -> list[str]:
    """Where the budgets came from: the budgets on `scale` (the training scale), their source, the training
    targets beside the continuations' true CSC, the accepted range, and the generations per level and table."""
    cont = combined["continuation_csc"]
    n_prompts, samples = len(combined["prompts"]), combined["samples_per_prompt"]
    return [f"budgets (CSC, scale={scale}): {_rounded(combined['budgets'])}",
            f"  from: {combined['budget_source']}",
            f"training targets (whole texts, all tokens counted): {[round(x, 4) for x in combined['training_targets']]}; "
            f"true CSC of training-text continuations: min {cont['min']:.4f} median {cont['median']:.4f} max {cont['max']:.4f}",
            f"budget range accepted (CSC): {[round(x, 4) for x in combined['budget_range']]}",
            f"{n_prompts} prompts x {samples} samples = {n_prompts * samples} generations per level and table; "
            f"{n_records} records"]


def paper_rows() -> list[dict[str, Any]]:
    """The paper's Table I (GPT-2 small, epoch 13), one row per level in `TABLE_I_COLUMNS`."""
    return [{"level": level, **{c: row[c] for c in TABLE_I_COLUMNS}} for level, row in zip(LEVELS, PAPER_TABLE1["rows"])]


def verified_budget_lines(combined: dict[str, Any]) -> list[str]:
    """The verified controller's budgets per scale and the model its candidates were sampled from."""
    budgets = {scale: _rounded(b) for scale, b in combined["verified_budgets"].items()}
    return [f"verified budgets per scale: {budgets}",
            f"candidates sampled from: {combined['verified_model']}"]


def verified_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level of a verified table: Table I in true CSC, Hit@10 with its interval, tokens, labels per
    generation and how the generations ended."""
    return [{"level": r["level"], **{c: r["csc"][c] for c in TABLE_I_COLUMNS}, "Hit@10 CI": hit_with_interval(r["csc"]),
             "tokens": r["mean_tokens"], "labels/gen": r["labels_per_generation"],
             "outcome": ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items()))} for r in table["rows"]]


def steering_rows(combined: dict[str, Any]) -> list[dict[str, Any]]:
    """Each verified table, steered or not: Hit@10 per level, labels per generation, MAE and the judge perplexity's
    change, sorted by scale, N and candidates (steered beside unsteered at the same N)."""
    rows = [{"scale": t["csc_scale"], "N": t["n_candidates"],
             "candidates": "steered" if is_steered_verified(t) else "unsteered",
             **{f"Hit@10 {r['level']}": r["csc"]["Hit@10"] for r in t["rows"]},
             "labels/gen": t["labels_per_generation"], "MAE": t["average_MAE_csc"],
             "judge ppl change": t["fluency"]["judge_ppl_rel_change"]}
            for t in tables_of(combined, "verified").values()]
    return sorted(rows, key=lambda r: (r["scale"], r["N"], r["candidates"]))


def proxy_space_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level of a proxy decoding in proxy space (C_vocab spend against the calibrated budget), with
    the MAE after calibration back to CSC, tokens and how the generations ended."""
    return [{"level": r["level"], **{c: r["proxy"][c] for c in TABLE_I_COLUMNS}, "calibrated MAE": r["calibrated"]["MAE"],
             "tokens": r["mean_tokens"], "stopped by": ", ".join(f"{k} {v}" for k, v in sorted(r["stopped_by"].items()))}
            for r in table["rows"]]


def example_tables(combined: dict[str, Any]) -> list[str]:
    """The tables whose generations notebook 04 shows: the unsteered verified controller with the largest N on
    each verified scale, and the steered proxy decoding of the first trained variant."""
    verified = [t for t in tables_of(combined, "verified").values() if not is_steered_verified(t)]
    shown = []
    for scale in combined["verified_budgets"]:
        on_scale = [t for t in verified if t["csc_scale"] == scale]
        if on_scale:
            shown.append(f"verified_n{max(t['n_candidates'] for t in on_scale)}_{scale}")
    model = tables_of(combined, "model")
    return shown + ([f"{next(iter(model.values()))['variant']}_steered"] if model else [])


def fluency_rows(combined: dict[str, Any]) -> list[dict[str, Any]]:
    """Judge perplexity and distinct-2 of budgeted text beside unbudgeted text, per table: the proxy decodings
    against unbudgeted generation (with the model's and backbone's validation perplexity), the verified tables
    against each prompt's first sample cut to the same length."""
    rows = []
    for key, t in tables_of(combined, "model").items():
        f = t["fluency"]
        rows.append({"table": key, "judge ppl": f["budgeted"]["judge_ppl"], "unbudgeted judge ppl": f["unbudgeted"]["judge_ppl"],
                     "rel. change": f["judge_ppl_rel_change"], "distinct-2": f["budgeted"]["distinct_2"],
                     "unbudgeted distinct-2": f["unbudgeted"]["distinct_2"], "tokens": f["budgeted"]["mean_tokens"],
                     "model val ppl": t["val_ppl"], "backbone val ppl": t["backbone_val_ppl"]})
    for key, t in tables_of(combined, "verified").items():
        f = t["fluency"]
        rows.append({"table": key, "judge ppl": f["judge_ppl"], "unbudgeted judge ppl": f["judge_ppl_same_length_unbudgeted"],
                     "rel. change": f["judge_ppl_rel_change"], "distinct-2": f["distinct_2"]})
    return rows


COST_MODEL_METRICS = ("token_spearman", "continuation_r2")  # how a cost model is scored on held-out text
CEILING_PREDICTORS = ("ridge_linear", "ridge_log", "token_mean", "token_count")  # the simple predictors beside it


def _learned_fits(combined: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each trained variant's plain-decoding table (the one that carries its cost-model fit), by variant."""
    return {t["variant"]: t for t in tables_of(combined, "model").values() if t["decoding"] == "plain"}


def cost_model_heading(combined: dict[str, Any], n_valid_texts: int) -> str:
    """The held-out text the cost models are scored on: tokens, texts, continuations and the true CSC's spread."""
    fit = combined["cost_model_ceiling"]["token_mean"]
    return (f"held-out: {fit['n_tokens']} tokens of {n_valid_texts} validation texts, {fit['n_continuations']} "
            f"continuations; true CSC sd/mean {fit['true_csc_cv']:.2f}")


def cost_model_rows(combined: dict[str, Any]) -> list[dict[str, Any]]:
    """Each learned cost model and simple predictor on held-out text: Spearman and R² with 95% intervals, and
    the spread of its predicted costs (sd/mean)."""
    def with_ci(fit: dict[str, Any]) -> dict[str, Any]:
        return {**{m: fit[m] for m in COST_MODEL_METRICS},
                **{f"{m} 95% CI": "[{:.2f}, {:.2f}]".format(*fit.get(f"{m}_ci", (math.nan,) * 2)) for m in COST_MODEL_METRICS},
                "sd/mean": fit["predicted_cost_cv"]}

    ceil = combined["cost_model_ceiling"]
    return ([{"model": f"learned, {v}", **with_ci(t["cost_model"])} for v, t in _learned_fits(combined).items()]
            + [{"model": name, **with_ci(ceil[name])} for name in CEILING_PREDICTORS])


def cost_model_goal_lines(combined: dict[str, Any]) -> list[str]:
    """The ceiling per metric (and the predictor that sets it), then each variant's learned score against it
    and its goal."""
    ceiling = combined["cost_model_ceiling"]["ceiling"]
    best = {m: f"{ceiling[m]:.3f} ({ceiling[m + '_by']})" for m in COST_MODEL_METRICS}
    lines = [f"ceiling: {best}"]
    for v, t in _learned_fits(combined).items():
        lines.append(f"{v}: " + "; ".join(
            f"{m} {c['learned']:.3f} = {100 * c['ratio']:.0f}% of the ceiling, goal {c['goal']:.3f}: "
            f"{'met' if c['met'] else 'NOT met'}" for m, c in t["cost_model_vs_ceiling"].items()))
    return lines


def committed_example_lines(combined: dict[str, Any], profile: str) -> list[str]:
    """Five generations per level of a committed run of `profile` (its `examples.jsonl`), for its first steered
    proxy decoding and its unsteered verified controller with the largest N, each with budget, true CSC and length."""
    model = [k for k, t in tables_of(combined, "model").items() if t["decoding"] == "steered"][:1]
    verified = {k: t for k, t in tables_of(combined, "verified").items() if not is_steered_verified(t)}
    largest = max((t["n_candidates"] for t in verified.values()), default=None)
    lines = []
    for table in model + [k for k, t in verified.items() if t["n_candidates"] == largest]:
        rows = gpu_results.committed_examples("budgets", profile=profile, table=table)
        lines.append(f"{table}:" if rows else f"{table}: no examples committed (runs before examples.jsonl)")
        lines += [f"  [{r['level']}] budget {r['budget_csc']:.3f}, true CSC {r['csc']:.3f}, {r['n_tokens']} tokens: "
                  f"{r['prompt']!r} -> {r['text']!r}" for r in rows]
    return lines


def hit_with_interval(csc: dict[str, Any], delta: int = 10) -> str:
    """'Hit@10 [lo, hi]' in percent, from a Table I row's `csc` entry."""
    lo, hi = csc.get(f"Hit@{delta}_ci", (math.nan, math.nan))
    return f"{csc[f'Hit@{delta}']:.0f} [{lo:.0f}, {hi:.0f}]"


def proxy_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level of a proxy decoding: Table I in true CSC with its interval, and how the texts ended."""
    out = []
    for r in table["rows"]:
        stops = r["stopped_by"]
        n = sum(stops.values())
        out.append({"level": r["level"], "Budget": r["csc"]["Budget"], "MAE": r["csc"]["MAE"],
                    "Hit@10 [95% CI]": hit_with_interval(r["csc"]), "Achieved": r["csc"]["Achieved"],
                    "tokens": r["mean_tokens"], "needed": r.get("tokens_needed", math.nan), "cap": r.get("max_new_tokens"),
                    "reachable": r.get("reachable", True),
                    "stops budget/sentence/eos/cap": "/".join(str(stops.get(k, 0)) for k in STOP_REASONS),
                    "on budget %": 100.0 * sum(stops.get(k, 0) for k in BUDGET_STOPS) / n if n else math.nan})
    return out


def controller_rows(combined: dict[str, Any], scale: str, seconds: bool = True) -> list[dict[str, Any]]:
    """The verified controller beside the label-free baselines on its own candidates, one scale: Hit@10 per level
    with intervals, labels (and, with `seconds`, seconds: wall time of the machine that ran it) per generation,
    judge perplexity against same-length plain samples."""
    keyed = {**tables_of(combined, "verified"), **tables_of(combined, "baseline")}
    out = []
    for key, t in keyed.items():
        if t["csc_scale"] != scale or t["decoding"] == "verified_steered":
            continue
        name = f"verified N={t['n_candidates']}" if t["variant"] == "verified" else f"baseline: {t['decoding']}"
        row = {"rule": name, **{f"Hit@10 {r['level']}": hit_with_interval(r["csc"]) for r in t["rows"]},
               "labels/gen": t["labels_per_generation"],
               **({"s/gen": t.get("seconds_per_generation", math.nan)} if seconds else {}),
               "judge ppl": t["fluency"]["judge_ppl"],
               "same-length plain ppl": t["fluency"]["judge_ppl_same_length_unbudgeted"]}
        out.append(row)
    return out


def smallest_hitting_n(combined: dict[str, Any], scale: str, goal_pct: float = 95.0) -> int | None:
    """The smallest N whose verified table (unsteered, on `scale`) hits >= `goal_pct` at every level; None if none."""
    ns = [t["n_candidates"] for t in tables_of(combined, "verified").values()
          if t["csc_scale"] == scale and t["decoding"] != "verified_steered"
          and all(r["csc"]["Hit@10"] >= goal_pct for r in t["rows"])]
    return min(ns) if ns else None


def stop_rule_rows(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """The stop rules on fixed held-out text, one scale: Hit@10 [95% CI] and mean tokens per level and rule."""
    out = []
    for rule, levels in rules["rules"].items():
        row: dict[str, Any] = {"rule": rule}
        for level, v in in_level_order(levels).items():
            row[f"Hit@10 {level}"] = hit_with_interval(v)
            row[f"tokens {level}"] = v["mean_tokens"]
        out.append(row)
    return out


def rules_on_text_and_generations(combined: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stop rule's Hit@10 on fixed held-out text beside the same rule on generated text, per scale and
    level: `exact` and verified N = 1 (one sample cut by exact labels), the label-free baselines on the
    verified candidates, `proxy` and the sampler's plain proxy decoding. Where the two differ, the generator
    (its text, not the rule) made the difference."""
    sampler = combined.get("verified_model", "").split(" ")[0]
    out = []
    for scale, rules in combined.get("stop_rules", {}).items():
        on_generations = {"exact": f"verified_n1_{scale}", "token_count": f"baseline_token_count_{scale}",
                          "random_cut": f"baseline_random_cut_{scale}", "proxy": f"{sampler}_plain"}
        for rule, key in on_generations.items():
            table = combined["tables"].get(key)
            if rule not in rules["rules"] or table is None or table["csc_scale"] != scale:
                continue
            generated = {r["level"]: r["csc"] for r in table["rows"]}
            for level, fixed in in_level_order(rules["rules"][rule]).items():
                if level in generated:
                    out.append({"rule": rule, "scale": scale, "level": level,
                                "on held-out text": hit_with_interval(fixed),
                                "on generations": hit_with_interval(generated[level]), "generated table": key})
    return out


def proxy_against_ceiling(combined: dict[str, Any]) -> list[dict[str, Any]]:
    """Each proxy decoding's Hit@10 per level beside the open-loop ceiling on the same scale (the best single
    length fitted on training text, scored on held-out text) and its share of it."""
    out = []
    for key, t in tables_of(combined, "model").items():
        rules = combined.get("stop_rules", {}).get(t["csc_scale"])
        if not rules:
            continue
        for r in t["rows"]:
            ceiling = rules["rules"]["length_fitted"][r["level"]]["Hit@10"]
            out.append({"table": key, "level": r["level"], "Hit@10": r["csc"]["Hit@10"],
                        "open-loop ceiling": ceiling,
                        "share of ceiling": r["csc"]["Hit@10"] / ceiling if ceiling > 0 else math.nan})
    return out


def examples(records: list[dict[str, Any]], table: str, per_level: int = 5) -> list[str]:
    """Up to `per_level` generated texts per level of one table (`<variant>_<decoding>`, or a verified or
    baseline table's key), each with its budget, true CSC and length."""
    lines, seen = [], {}
    for r in records:
        if gpu_results.table_key(r) != table or seen.get(r["level"], 0) >= per_level:
            continue
        seen[r["level"]] = seen.get(r["level"], 0) + 1
        lines.append(f"[{r['level']}] budget {r['budget_csc']:.3f}, true CSC {r['csc']:.3f}, "
                     f"{len(r['generated_ids'])} tokens: {r['prompt']!r} -> {r['text']!r}")
    return lines


def hit_bars(combined: dict[str, Any], scale: str, title: str):
    """Hit@10 per level with Wilson 95% error bars: the proxy decodings, the verified controller, its baselines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, t in combined["tables"].items():
        if t["csc_scale"] != scale:
            continue
        levels = [r["level"] for r in t["rows"]]
        hits = np.array([r["csc"]["Hit@10"] for r in t["rows"]])
        ci = np.array([r["csc"].get("Hit@10_ci", [math.nan, math.nan]) for r in t["rows"]])
        fig.add_bar(name=key, x=levels, y=hits,
                    error_y=dict(type="data", symmetric=False, array=ci[:, 1] - hits, arrayminus=hits - ci[:, 0]))
    fig.update_layout(title=f"{title}<br><sup>bars: Hit@10 in true CSC; whiskers: Wilson 95% intervals</sup>",
                      xaxis_title="budget level", yaxis_title="Hit@10 (%)", yaxis_range=[0, 105], barmode="group")
    return fig


def _levels(values: dict[str, float], fmt: str = "{:.0f}") -> str:
    return ", ".join(f"{level} {fmt.format(v)}" for level, v in in_level_order(values).items())


def stop_summary(combined: dict[str, Any]) -> str | None:
    """How the proxy decodings ended (budget or sentence end vs EOS or cap), their lengths per level, and the
    proxy rate their token caps were sized from; None without proxy tables."""
    proxy = tables_of(combined, "model")
    rows = [r for t in proxy.values() for r in t["rows"]]
    if not rows:
        return None
    total = sum(sum(r["stopped_by"].values()) for r in rows)
    on_budget = sum(r["stopped_by"].get(k, 0) for r in rows for k in BUDGET_STOPS)
    lengths = in_level_order({level: float(np.mean([r["mean_tokens"] for r in rows if r["level"] == level]))
                              for level in dict.fromkeys(r["level"] for r in rows)})
    unreachable = sorted({r["level"] for r in rows if not r.get("reachable", True)})
    rising = all(a < b for a, b in zip(list(lengths.values()), list(lengths.values())[1:]))
    rates = {t["variant"]: t["proxy_rate"]["per_token"] for t in proxy.values() if "proxy_rate" in t}
    rate = (f" Token caps: {TOKEN_CAP_HEADROOM:g}x the tokens each budget needs at the generator's own proxy rate per "
            f"token ({_levels(rates, '{:.5f}')}, over its unbudgeted samples of the same prompts), at most the context."
            if rates else "")
    return (f"Proxy decodings (budget forcing + budget stop on C_vocab): {on_budget} of {total} generations "
            f"({100 * on_budget / total:.1f}%) ended on the budget or a sentence end; mean tokens per level "
            f"{_levels(lengths, '{:.1f}')} ({'rising' if rising else 'NOT rising'} with the budget); "
            f"levels not reachable within the context: {', '.join(unreachable) if unreachable else 'none'}.{rate}")


def conclusion(combined: dict[str, Any], run_label: str, seconds: bool = False) -> list[str]:
    """The paragraphs of notebook 04's "What this run shows", each number read from `combined` (wall times
    only with `seconds`: they depend on the machine, and the notebook's outputs are checked)."""
    n_prompts, samples = len(combined["prompts"]), combined.get("samples_per_prompt", 1)
    out = [f"Measured on the {run_label}, CPU: {n_prompts} prompts x {samples} samples = {n_prompts * samples} generations "
           "per level and table; Hit@10 in true CSC, [Wilson 95% interval]. Goal: Hit@10 >= 90% at every level with "
           "the judge perplexity at most 10% above unbudgeted text (one-sided)."]
    proxy = tables_of(combined, "model")
    summary = stop_summary(combined)
    if summary:
        out.append(summary)
        for key, t in proxy.items():
            out.append(f"- {key}: Hit@10 " + ", ".join(f"{r['level']} {hit_with_interval(r['csc'])}" for r in t["rows"])
                       + f"; judge perplexity {100 * t['goal']['judge_ppl_rel_change']:+.0f}% vs unbudgeted.")
        ceiling = proxy_against_ceiling(combined)
        if ceiling:
            best = max(ceiling, key=lambda r: r["Hit@10"])
            out.append(f"The open-loop ceiling (one stop length per level fitted on training text, scored on held-out "
                       f"text) is Hit@10 {_levels({r['level']: r['open-loop ceiling'] for r in ceiling})} on the "
                       f"{next(iter(proxy.values()))['csc_scale']} scale; the best proxy cell reaches {best['Hit@10']:.0f} "
                       f"({best['table']}, {best['level']}).")
    for scale in combined["verified_budgets"]:
        tables = {**tables_of(combined, "verified"), **tables_of(combined, "baseline")}
        n = smallest_hitting_n(combined, scale)
        baseline = tables.get(f"baseline_token_count_{scale}")
        line = f"Verified controller, {scale} scale: Hit@10 >= 95% at every level first with N = {n if n else 'none'}"
        if n:
            t = tables[f"verified_n{n}_{scale}"]
            wall = f" and {t['seconds_per_generation']:.2f} s" if seconds else ""
            line += (f" ({_levels({r['level']: r['csc']['Hit@10'] for r in t['rows']})}; "
                     f"{t['labels_per_generation']:.0f} labels{wall} per generation)")
        if baseline:
            line += ("; the token-count rule on the same candidates, without labels: "
                     + ", ".join(f"{r['level']} {hit_with_interval(r['csc'])}" for r in baseline["rows"])
                     + (f" ({baseline['seconds_per_generation']:.2f} s per generation)" if seconds else ""))
        out.append(line + ".")
    for scale, rules in combined.get("stop_rules", {}).items():
        r = rules["rules"]
        picks = [k for k in ("exact", "length_fitted", "token_count", "proxy") if k in r]
        out.append(f"On fixed held-out text ({rules['n_held_out']} continuations, {scale} scale), Hit@10 per rule: "
                   + "; ".join(f"{k} {_levels({lv: v['Hit@10'] for lv, v in r[k].items()})}" for k in picks)
                   + ". `exact` falls short only where a text cannot reach the budget at any word end.")
    return out


def cost_model_conclusion(combined: dict[str, Any]) -> list[str]:
    """The learned cost model against its ceiling, and whether steered candidates made the controller cheaper."""
    ceil = combined["cost_model_ceiling"]
    fits = {k.rsplit("_", 1)[0]: t for k, t in tables_of(combined, "model").items() if k.endswith("_plain")}
    out = []
    if fits:
        def one(v: str, t: dict[str, Any]) -> str:
            c, fit = t["cost_model_vs_ceiling"], t["cost_model"]
            lo, hi = fit.get("token_spearman_ci", (math.nan, math.nan))
            return (f"{v}: Spearman {c['token_spearman']['learned']:.2f} [{lo:.2f}, {hi:.2f}] "
                    f"({100 * c['token_spearman']['ratio']:.0f}% of {c['token_spearman']['ceiling']:.2f}), continuation "
                    f"R^2 {c['continuation_r2']['learned']:.2f} (ceiling {c['continuation_r2']['ceiling']:.2f}); goal "
                    f"{'met' if all(m['met'] for m in c.values()) else 'NOT met'}")
        line = ("The learned cost model on held-out validation text, against the best simple predictor fitted on the "
                "same labels (the ceiling): " + "; ".join(one(v, t) for v, t in fits.items()) + ".")
        if "token_count" in ceil:  # runs before the length-only reference have none
            lo, hi = ceil["token_count"].get("continuation_r2_ci", (math.nan, math.nan))
            line += (f" Length alone (a constant cost per token) explains continuation R^2 "
                     f"{ceil['token_count']['continuation_r2']:.2f} [{lo:.2f}, {hi:.2f}] over these "
                     f"{ceil['token_count']['n_continuations']} held-out continuations.")
        out.append(line)
    verified = tables_of(combined, "verified")
    pairs = [(t, verified.get(k.replace("verified_steered_", "verified_"))) for k, t in verified.items()
             if t["decoding"] == "verified_steered"]
    pairs = [(s, u) for s, u in pairs if u]
    if pairs:
        fewer = sum(s["labels_per_generation"] < u["labels_per_generation"] for s, u in pairs)
        better = sum(s["goal"]["hit_ok"] and not u["goal"]["hit_ok"] for s, u in pairs)
        out.append(f"Steered candidates (learned costs in the sampler): fewer labels per generation than unsteered at the "
                   f"same N in {fewer} of {len(pairs)} rows; Hit@10 >= 90% on every level where unsteered missed it in "
                   f"{better} of {len(pairs)}.")
    return out
