#!/usr/bin/env bash
# The `cpu` profile's budget evaluation on any CPU, as one command (issue 22: evidence at 16 prompts per
# level and 96 validation texts, where smoke has 4 and 12). From the repository root, after `make test`
# or `make study` has installed the environment:
#
#   bash scripts/cpu_budgets.sh                 # corpus -> evaluate on the cpu profile, then the results
#   STAGES=evaluate bash scripts/cpu_budgets.sh # re-evaluate (the earlier stages must exist)
#
# Writes the same files as part a of scripts/gpu_results.sh (Table I for both variants x plain/steered,
# the verified controller unsteered and steered, the cost model against its ceiling, training metrics,
# stage timings) and its summary.json (profile cpu) to results/budgets/cpu-<machine>/. Commit that
# folder: notebook 04 shows it beside smoke (`metabolic.report.gpu_results.rows(..., profile="cpu")`).
set -euo pipefail
source "$(dirname "$0")/budget_files.sh"

PROFILE=${PROFILE:-cpu}
STAGES=${STAGES:-"..evaluate"}  # every stage up to evaluate, in the pipeline's order (metabolic.pipeline.stages)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
run="data/$PROFILE"

start=$SECONDS
"$PY" -m metabolic run --profile "$PROFILE" --stages "$STAGES" 2>&1 | tee "/tmp/cpu_budgets.log"
elapsed=$(( SECONDS - start ))
name=$("$PY" -c "import platform, re
cpu = next((l.split(':', 1)[1] for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor() or 'cpu')
print(cpu.strip())")
dest="results/budgets/cpu-$(echo "$name" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
mkdir -p "$dest"
"$PY" -m metabolic config --profile "$PROFILE" > "$dest/study_config.json"
copy_budget_files "$run" "$dest"
PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m metabolic.report.gpu_results summarise budgets "$dest" \
  --status complete --cap 0 --elapsed "$elapsed" --profile "$PROFILE" --device-name "$name ($(nproc) cores, CPU)" \
  --command "bash scripts/cpu_budgets.sh" --note "the $PROFILE profile on a CPU, $(( elapsed / 60 )) min wall"
