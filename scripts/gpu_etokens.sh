#!/usr/bin/env bash
# The e-token grid on one GPU, one part per call (<= 8 minutes), resumable on a fresh machine.
#
# The `gpu` profile's grid (metabolic.energy.plan: 3 random-weight GPT-2 shapes x 4 tasks x batch
# 1/8/32 x the default and static serving paths, 3 repeats, plus the joule calibration) is planned
# at about 20 minutes of one H100, in 3 parts. Each call of this script:
#   1. restores the units kept by earlier calls from .etokens-state/state.tgz (when carried);
#   2. prints the plan (what is left, its time estimate, its parts) and measures the next part
#      (`energy.part_seconds` of the gpu profile, 440 s; PART_SECONDS overrides), keeping every unit
#      the moment it is measured, so even a kill loses at most the unit in flight;
#   3. saves every kept unit to $OUT/etokens-state.tgz (carry it back for the next call);
#   4. once the grid is complete: copies the results to results/etokens/<GPU>-<key>/ and $OUT/etokens/,
#      and prints a short table. It says "grid complete" or "grid unfinished" as its last line.
#
# With the device tool, from the project checkout (the session's side):
#   ../shared/scripts/pack-device-assets                    # once: .assets/assets.tar.gz, ignored by git
#   grep -qx '/.etokens-state/' .git/info/exclude || echo '/.etokens-state/' >> .git/info/exclude
#   mkdir -p .etokens-state
#   run(command="bash scripts/gpu_etokens.sh", carry=[".assets", ".etokens-state"], timeout_s=600)
#   cp <files_at>/etokens-state.tgz .etokens-state/state.tgz        # after every call, then call again
#   # when it says "grid complete":
#   mkdir -p results/etokens/<folder> && cp <files_at>/etokens/* results/etokens/<folder>/   # <folder>: printed
#
# Without the device tool (a GPU machine of your own): `bash scripts/gpu_etokens.sh` until it says
# "grid complete" (the state stays in data/gpu/etokens/, or under $METABOLIC_DATA), or the whole grid in one run:
#   python -m metabolic run --profile gpu --stages etokens --set energy.part_seconds=None
# BENCH=1 also runs benchmarks/energy_meter.py (the meter vs zeus, and its overhead). STOP_AFTER_S (540)
# interrupts a run whose part overruns its estimate, so the kept units are still saved in time.
set -euo pipefail

PROFILE=${PROFILE:-gpu}
STATE=.etokens-state/state.tgz
source "$(dirname "$0")/gpu_common.sh"
"$PY" -c "import pynvml; pynvml.nvmlInit(); print('GPU:', pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))" \
  || { echo "no NVIDIA GPU/NVML on this machine: this script measures GPU energy (CPU timings: python -m metabolic run --stages etokens)"; exit 1; }

results="${METABOLIC_DATA:-data}/$PROFILE/etokens"
mkdir -p "$results"
if [ -f "$STATE" ]; then
  tar xzf "$STATE" -C "$results"
  echo "restored $(find "$results" -path '*/cells/*.json' | wc -l) kept units from $STATE"
fi

args=(--profile "$PROFILE" --stages etokens --set energy.measure=always)
if [ -n "${PART_SECONDS:-}" ]; then args+=(--set "energy.part_seconds=$PART_SECONDS"); fi
# A part ends by itself (energy.part_seconds); should the estimates be far off, SIGINT at STOP_AFTER_S
# stops it anyway, keeping every finished unit, so the state below is still saved within the
# device's 10-minute command limit.
rc=0
timeout -s INT "${STOP_AFTER_S:-540}" "$PY" -m metabolic run "${args[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then echo "!! the run ended with status $rc (124/130: stopped at ${STOP_AFTER_S:-540} s); its kept units are saved below"; fi

if [ "${BENCH:-0}" = 1 ]; then
  "$PY" benchmarks/energy_meter.py | tee "$results/energy_meter_benchmark.txt"
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/etokens-state.tgz" -C "$results" --exclude='.*.lock' .
  echo "kept units saved to \$OUT/etokens-state.tgz: carry it back as $STATE for the next call"
fi

# the finished folder of this profile's grid on this GPU (no .partial left means the grid is complete)
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ]; then exit "$rc"; fi
if compgen -G "$results/*.partial" > /dev/null; then
  echo "grid unfinished: call this script again (with the state carried back) to measure the next part"
  exit 0
fi
folder=$(ls -td "$results"/*/ 2>/dev/null | grep -v '\.partial/$' | head -1)
folder=${folder%/}
name=$(basename "$folder")
mkdir -p "results/etokens/$name"
for f in rows.jsonl machine.json calibration.json manifest.json study_config.json energy_meter_benchmark.txt; do
  if [ -f "$folder/$f" ]; then cp "$folder/$f" "results/etokens/$name/"; fi
done
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/etokens" && cp "results/etokens/$name"/* "$OUT/etokens/"; fi
"$PY" - "results/etokens/$name/rows.jsonl" <<'PY'
import sys
from metabolic.energy.measurement import read_rows, summarise, window_resolution_note
rows = read_rows(sys.argv[1])
print(f"{'model':<20} {'path':<8} {'task':<15} {'B':>3} {'J/query':>9} {'active':>28} {'Wh/1k out':>10} {'tok/s':>8}")
for t in summarise(rows):
    print(f"{t['model'][:20]:<20} {t['path']:<8} {t['task']:<15} {t['batch_size']:>3} {t['total_j'] or float('nan'):>9.3g} "
          f"{t['active_text']:>28} {t['e_out_wh'] or float('nan'):>10.3g} {t['output_tokens_per_s']:>8.0f}")
print(window_resolution_note(rows))
PY
echo "grid complete: results/etokens/$name/ (commit it; copy \$OUT/etokens/* there when measured on the device machine)"
