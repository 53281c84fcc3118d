#!/usr/bin/env bash
# Issue 15's acceptance on a GPU machine: the MetabolicGPT-2 training step against the plain LM step
# (target <= 1.15x for both variants) and budgeted decoding against plain generate() at batch 8
# (target <= 1.10x per token, default steering), with torch.profiler tables of each, on the `gpu`
# profile's architecture (6 x 384, batch 16 x 256, bf16 autocast). Speed does not depend on the
# weights, so both benchmarks run on randomly initialised models (--scratch): no pipeline stage is
# needed beyond the corpus (tokenizer and texts, a few seconds) and the CSC encoder for the verified
# controller's row.
#
#   bash scripts/gpu_overhead.sh
#
# With the device tool (assets packed by ../shared/scripts/pack-device-assets, carried as .assets):
#   mkdir -p /tmp/a && tar xzf .assets/assets.tar.gz -C /tmp/a && METABOLIC_ASSETS=/tmp/a bash scripts/gpu_overhead.sh
#
# Writes results/overhead/<gpu>/{train_overhead,generation_overhead}.txt (the printed tables) and
# profiles/ (operator tables by self CUDA time, Chrome traces), and saves them to $OUT when set.
set -euo pipefail

PROFILE=${PROFILE:-gpu}
source "$(dirname "$0")/gpu_common.sh"
require_cuda "on the CPU run the benchmarks with --profile smoke"

gpu=$(gpu_slug)
dest="results/overhead/$gpu"
mkdir -p "$dest/profiles"
"$PY" -m metabolic run --profile "$PROFILE" --stages corpus
"$PY" benchmarks/train_overhead.py --profile "$PROFILE" --device cuda --scratch --steps 20 --warmup 5 \
  --profile-trace "$dest/profiles" | tee "$dest/train_overhead.txt"
"$PY" benchmarks/generation_overhead.py --profile "$PROFILE" --device cuda --scratch --batch 8 --repeats 5 \
  --candidates 4 --profile-trace "$dest/profiles" | tee "$dest/generation_overhead.txt"
# $OUT keeps 8 files at most, 2 folders deep: the tables as they are, everything (profiles, traces) in one archive
if [ -n "${OUT:-}" ]; then
  cp "$dest"/*.txt "$OUT/" && tar czf "$OUT/overhead-$gpu.tgz" -C results/overhead "$gpu"
  echo "unpack with: tar xzf overhead-$gpu.tgz -C results/overhead   (then commit results/overhead/$gpu)"
fi
