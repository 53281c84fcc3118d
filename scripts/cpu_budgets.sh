#!/usr/bin/env bash
# The `cpu` profile's budget evaluation, on any CPU, as one command (issue 22: evidence at 16 prompts per
# level instead of smoke's 4). From the repository root, in the project's environment (make installs it):
#
#   bash scripts/cpu_budgets.sh                 # corpus -> evaluate on the cpu profile, then the results
#   STAGES=evaluate bash scripts/cpu_budgets.sh # re-evaluate (the earlier stages must exist)
#
# Writes Table I for both variants x plain/steered, the verified controller (N = 1, 2, 4, 8, unsteered and
# steered, raw and length scales), the cost model against its ceiling and the stage timings to
# results/budgets/cpu-<machine>/ (small JSON). Commit that folder: notebook 04 shows it beside smoke.
set -euo pipefail

PROFILE=${PROFILE:-cpu}
STAGES=${STAGES:-"corpus,pretrain,prior,csc,train,evaluate"}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PY" -m metabolic run --profile "$PROFILE" --stages "$STAGES"
machine=$("$PY" -c "import platform, re
name = next((l.split(':', 1)[1] for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor() or 'cpu')
print('cpu-' + re.sub('[^A-Za-z0-9]+', '-', name).strip('-').lower())")
dest="results/budgets/$machine"
mkdir -p "$dest"
cp "data/$PROFILE/evaluation/tables.json" "$dest/tables.json"
cp "data/$PROFILE/run_timings.json" "$dest/run_timings.json"
"$PY" - "$dest" "$(nproc)" <<'PY'
import json, platform, sys
dest, cores = sys.argv[1], int(sys.argv[2])
timings = json.load(open(f"{dest}/run_timings.json"))
json.dump({"machine": dest.rsplit("/", 1)[-1], "cores": cores, "python": platform.python_version(),
           "wall_s": timings["total_s"]}, open(f"{dest}/machine.json", "w"), indent=2)
d = json.load(open(f"{dest}/tables.json"))
print(f"{len(d['prompts'])} prompts; wall {timings['total_s'] / 60:.1f} min on {cores} cores")
for k, t in d["tables"].items():
    hits = "/".join(f"{r['csc']['Hit@10']:.0f}" for r in t["rows"])
    print(f"{k:<30} Hit@10 {hits:<14} MAE {t['average_MAE_csc']:.3f} labels/gen {t.get('labels_per_generation', float('nan')):.0f}")
PY
