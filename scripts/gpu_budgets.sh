#!/usr/bin/env bash
# Budget tracking on the `gpu` profile, on a GPU machine (no Jupyter needed: the GPU image has torch,
# transformers and sentence-transformers). One command, corpus to evaluation (issue 12's acceptance):
#
#   bash scripts/gpu_budgets.sh                         # every stage up to evaluate, then the results
#   STAGES=evaluate bash scripts/gpu_budgets.sh         # re-evaluate (the earlier stages must exist)
#
# With the device tool (assets packed by ../shared/scripts/pack-device-assets, carried as .assets):
#   mkdir -p /tmp/a && tar xzf .assets/assets.tar.gz -C /tmp/a && METABOLIC_ASSETS=/tmp/a bash scripts/gpu_budgets.sh
#
# Writes the evaluation (Table I for faithful/expected-cost x plain/steered, the verified controller for
# N = 1, 2, 4, 8 on the raw and length scales, the cost model's Spearman/R²) to results/budgets/<gpu>/
# (small JSON), and copies it to $OUT when set. Commit results/budgets/ so notebook 04's numbers for the
# gpu profile live in the repository.
set -euo pipefail

PROFILE=${PROFILE:-gpu}
STAGES=${STAGES:-"corpus,pretrain,prior,csc,train,evaluate"}
source "$(dirname "$0")/gpu_common.sh"
require_cuda "the gpu profile is for one H100 (smoke runs anywhere: make study)"

"$PY" -m metabolic run --profile "$PROFILE" --stages "$STAGES"
gpu=$(gpu_slug)
dest="results/budgets/$gpu"
mkdir -p "$dest"
cp "data/$PROFILE/evaluation/tables.json" "$dest/tables.json"
cp "data/$PROFILE/run_timings.json" "$dest/run_timings.json"
"$PY" - "$dest/tables.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{'table':<28} {'Hit@10 low/med/high':<22} {'MAE':>7} {'ppl chg':>8} {'labels/gen':>10} {'s/gen':>7}")
for k, t in d["tables"].items():
    hits = "/".join(f"{r['csc']['Hit@10']:.0f}" for r in t["rows"])
    change = t["fluency"].get("judge_ppl_rel_change", float("nan"))
    print(f"{k:<28} {hits:<22} {t['average_MAE_csc']:>7.3f} {change:>+8.2f} "
          f"{t.get('labels_per_generation', float('nan')):>10.0f} {t.get('seconds_per_generation', float('nan')):>7.2f}")
for k, t in d["tables"].items():
    if "cost_model" in t and k.endswith("plain"):
        print(k.rsplit("_", 1)[0], "cost model:", {a: round(b, 3) for a, b in t["cost_model"].items()})
PY
if [ -n "${OUT:-}" ]; then cp -r "$dest" "$OUT/"; fi
