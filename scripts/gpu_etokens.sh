#!/usr/bin/env bash
# e-tokens on a GPU machine: no Jupyter needed (the GPU image has torch, transformers,
# sentence-transformers and nvidia-ml-py). Run from the repository root:
#
#   bash scripts/gpu_etokens.sh                 # every model, both serving paths, then the meter benchmark
#   MODELS="tiny gpu-6x384" bash scripts/gpu_etokens.sh
#   PARTS=calib bash scripts/gpu_etokens.sh    # one part per command where a command may run <= 10 min
#
# The calibration and each model x path are separate `python -m metabolic run` calls (a few minutes
# each, under a 10-minute command limit). Results land in
# data/<profile>/etokens/<GPU>-<host>-<key>/ (rows.jsonl, calibration.json, machine.json); copy those
# folders into the same place on any machine and notebook 05 (or metabolic.energy.measurement.merge_results)
# merges every machine into one table. With $OUT set, the results and the benchmark log are copied there.
#
# The single-command form also works: python -m metabolic run --profile gpu --stages etokens
set -euo pipefail

PROFILE=${PROFILE:-gpu}
MODELS=${MODELS:-"tiny gpu-6x384 gpt2-small-scratch gpt2 metabolic"}
PATHS=${PATHS:-"default static-compile"}
PARTS=${PARTS:-"calib grid bench"}  # e.g. PARTS=grid MODELS=gpt2-small-scratch PATHS=default for one part per command
PY=${PYTHON:-python}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/lib"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# offline assets (wikitext-2/, gpt2-tokenizer/): $METABOLIC_ASSETS, else shared/data in or beside the checkout
if [ -z "${METABOLIC_ASSETS:-}" ]; then
  for d in "$PWD/shared/data" "$PWD/../shared/data"; do [ -d "$d" ] && export METABOLIC_ASSETS="$d" && break; done
fi
echo "assets: ${METABOLIC_ASSETS:-<unset: the Hub>}"

"$PY" -c "import pynvml; pynvml.nvmlInit(); print('GPU:', pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))" \
  || { echo "no NVIDIA GPU/NVML on this machine: this script measures GPU energy (CPU timings: python -m metabolic run --stages etokens)"; exit 1; }

run() {  # one `python -m metabolic run` per part keeps each under the 10-minute command limit
  echo "== etokens: $*"
  "$PY" -m metabolic run --profile "$PROFILE" --stages etokens --set energy.measure=always "$@" \
    || echo "!! part failed ($*); continuing"
}
# 1. calibration and joule budgets (semantic cost -> J, tokens -> J, Hit@10%), with a one-cell grid
if [[ " $PARTS " == *" calib "* ]]; then
  run --set energy.models=tiny --set energy.tasks=chat --set energy.batch_sizes=1 --set energy.paths=default \
      --set energy.calibrate=true
fi
# 2. the e-token grid, one model and one serving path at a time (outputs are compared by hash across runs)
if [[ " $PARTS " == *" grid "* ]]; then
  for model in $MODELS; do
    for path in $PATHS; do
      run --set "energy.models=$model" --set "energy.paths=$path" --set energy.calibrate=false
    done
  done
fi
if [[ " $PARTS " == *" bench "* ]]; then
  mkdir -p "data/$PROFILE/etokens"
  "$PY" benchmarks/energy_meter.py | tee "data/$PROFILE/etokens/energy_meter_benchmark.txt"
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/etokens"
  cp -r "data/$PROFILE/etokens/." "$OUT/etokens/"
  echo "results copied to $OUT/etokens"
fi
