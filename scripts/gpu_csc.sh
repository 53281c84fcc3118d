#!/usr/bin/env bash
# CSC labelling throughput on one GPU (issue 13's acceptance), in two parts that each fit a 10-minute
# command (the GPU image has torch, transformers and sentence-transformers). Run from the repository root:
#
#   bash scripts/gpu_csc.sh                 # both parts
#   PARTS=ratio bash scripts/gpu_csc.sh     # one part per command
#
#   ratio: 300 texts of 256 GPT-2 tokens, every position: the labeller in fp32/tf32/fp16 and the labeller
#          without splicing (decode + tokenize every counterfactual, as before issue 13) against the
#          naive SentenceTransformer.encode baseline, on the same sequences in the same run (>= 10x);
#   scale: 2,000 texts of 256 tokens, every position (514,000 labels), labeller only (<= 60 s).
#
# With the device tool (assets packed here by ../shared/scripts/pack-device-assets, carried as .assets):
#   mkdir -p /tmp/a && tar xzf .assets/assets.tar.gz -C /tmp/a && METABOLIC_ASSETS=/tmp/a bash scripts/gpu_csc.sh
# Each part's output is written to results/csc_throughput/<gpu>/<part>.txt and, with $OUT set, copied there.
#
# Several GPUs (issue 13, item 3): the csc stage's chunks are shared by torchrun ranks, one GPU each, and
# rank 0 commits the one cache (byte-identical to one process; a killed run resumes with the same command):
#   torchrun --nproc-per-node "$(nvidia-smi -L | wc -l)" -m metabolic run --profile gpu --stages csc
set -euo pipefail

PARTS=${PARTS:-"ratio scale"}
source "$(dirname "$0")/gpu_common.sh"
export TOKENIZERS_PARALLELISM=true
require_cuda "on the CPU run python benchmarks/csc_throughput.py --device cpu --full-path"
gpu=$(gpu_slug)
dest="results/csc_throughput/$gpu"
mkdir -p "$dest"

if [[ " $PARTS " == *" ratio "* ]]; then
  "$PY" benchmarks/csc_throughput.py --profile gpu --device cuda --tokens 256 --sequences 300 --full-path --repeats 1 \
    | tee "$dest/ratio.txt"
fi
if [[ " $PARTS " == *" scale "* ]]; then
  "$PY" benchmarks/csc_throughput.py --profile gpu --device cuda --tokens 256 --sequences 2000 --precisions fp16,tf32 \
    --skip-naive --repeats 1 | tee "$dest/scale.txt"
fi
if [ -n "${OUT:-}" ]; then
  cp "$dest"/*.txt "$OUT/"
  echo "results copied to $OUT"
fi
