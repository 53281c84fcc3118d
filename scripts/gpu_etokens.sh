#!/usr/bin/env bash
# e-tokens on a GPU machine: no Jupyter needed (the GPU image has torch, transformers,
# sentence-transformers and nvidia-ml-py). Run from the repository root:
#
#   bash scripts/gpu_etokens.sh                 # every model, both serving paths, then the meter benchmark
#   MODELS="tiny gpu-6x384" bash scripts/gpu_etokens.sh
#
# Each model is its own `python -m metabolic run` (a few minutes each, under a 10-minute
# command limit); the calibration and joule budgets run once, with the first model. Results land in
# data/<profile>/etokens/<GPU>-<host>-<key>/ (rows.jsonl, calibration.json, machine.json); copy those
# folders into the same place on any machine and notebook 05 (or metabolic.query_energy.merge_results)
# merges every machine into one table. With $OUT set, the results and the benchmark log are copied there.
#
# The single-command form also works: python -m metabolic run --profile gpu --stages etokens
set -euo pipefail

PROFILE=${PROFILE:-gpu}
MODELS=${MODELS:-"tiny gpu-6x384 gpt2-small-scratch gpt2 metabolic"}
PATHS=${PATHS:-"default,static-compile"}  # comma list: both in one run, so their greedy outputs are compared
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

calibrate=true
for model in $MODELS; do
  echo "== etokens: model=$model paths=$PATHS calibrate=$calibrate"
  "$PY" -m metabolic run --profile "$PROFILE" --stages etokens \
    --set "energy.models=$model" --set "energy.paths=$PATHS" --set "energy.calibrate=$calibrate" \
    --set "energy.measure=always" || echo "!! $model failed (see above); continuing"
  calibrate=false
done

"$PY" benchmarks/energy_meter.py | tee "data/$PROFILE/etokens/energy_meter_benchmark.txt"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/etokens"
  cp -r "data/$PROFILE/etokens/." "$OUT/etokens/"
  echo "results copied to $OUT/etokens"
fi
