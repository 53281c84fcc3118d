#!/usr/bin/env bash
# The e-token grid on one GPU, one part per call, resumable on a fresh machine. scripts/gpu_results.sh
# (part c) measures a slice of the grid first through this script; each later call measures the next part.
#
# The `gpu` profile's grid (metabolic.energy.plan: 3 random-weight GPT-2 shapes x 4 tasks x batch
# 1/8/32 x the default and static serving paths, 3 repeats, plus the joule fit) is planned
# at about 20 minutes of one H100, in 3 parts. Each call of this script:
#   1. restores the units kept by earlier calls from $STATE (.etokens-state/state.tgz, when carried);
#   2. prints the plan (what is left, its time estimate, its parts) and measures the next part
#      (`energy.part_seconds` of the gpu profile, 440 s; PART_SECONDS overrides; ONLY=pattern,... measures only
#      the units whose keys match, see `energy.only`; SET="key=value ..." adds overrides), keeping every unit the moment it is measured, so even
#      a kill loses at most the unit in flight;
#   3. saves every kept unit to $OUT/etokens-state.tgz (carry it back for the next call);
#   4. writes the rows measured so far to $RESULTS/etokens/<gpu>/rows.jsonl (results/ unless RESULTS is
#      given), and once the grid is complete its machine and joule-fit records beside them, with a table.
#      It says "grid complete" or "grid unfinished" as its last line.
#
# The grid is the one a bare machine sees: `energy.models` without a trained MetabolicGPT-2 (none is
# carried), so every call, gpu_results.sh's slice included, adds to the same grid (one fingerprint).
#
# With the device tool, from the project checkout (the session's side):
#   ../shared/scripts/pack-device-assets                    # once: .assets/assets.tar.gz, ignored by git
#   scripts/pack-zeus-wheels                                # once: .assets/wheels (zeus, offline on the GPU)
#   grep -qx '/.etokens-state/' .git/info/exclude || echo '/.etokens-state/' >> .git/info/exclude
#   mkdir -p .etokens-state && cp <files_at>/etokens-state.tgz .etokens-state/state.tgz   # from gpu_results.sh
#   run(command="bash scripts/gpu_etokens.sh", carry=[".assets", ".etokens-state"], timeout_s=600)
#   cp <files_at>/etokens-state.tgz .etokens-state/state.tgz        # after every call, then call again
#   tar xzf <files_at>/etokens.tgz -C results                       # the rows so far (results/etokens/<gpu>/)
#
# Without the device tool (a GPU machine of your own): `bash scripts/gpu_etokens.sh` until it says
# "grid complete" (the state stays in data/gpu/etokens/, or under $METABOLIC_DATA), or the whole grid in one run:
#   python -m metabolic run --profile gpu --stages etokens --set energy.part_seconds=None
# BENCH=1 also runs benchmarks/energy_meter.py (the adapter vs a bare ZeusMonitor, and its overhead). STOP_AFTER_S (540)
# interrupts a run whose part overruns its estimate, so the kept units are still saved in time.
set -euo pipefail

PROFILE=${PROFILE:-gpu}
STATE=${STATE:-.etokens-state/state.tgz}
source "$(dirname "$0")/gpu_common.sh"
require_nvml "this script measures GPU energy (CPU timings, and CPU joules where RAPL is readable: python -m metabolic run --stages etokens)"
ensure_zeus  # the meter is zeus: installed offline from .assets/wheels when the image lacks it

data="${METABOLIC_DATA:-data}"
results="$data/$PROFILE/etokens"
mkdir -p "$results"
if [ -f "$STATE" ]; then
  tar xzf "$STATE" -C "$results"
  echo "restored $(find "$results" -path '*/cells/*.json' | wc -l) kept units from $STATE"
fi

args=(--profile "$PROFILE" --stages etokens --set energy.measure=always)
# a bare machine's grid: the profile's models without the trained MetabolicGPT-2 (see above)
args+=(--set "energy.models=$("$PY" -c "from metabolic.core.profiles import load_config
print(','.join(m for m in load_config('$PROFILE').energy.models if m != 'metabolic'))")")
if [ -n "${PART_SECONDS:-}" ]; then args+=(--set "energy.part_seconds=$PART_SECONDS"); fi
if [ -n "${ONLY:-}" ]; then args+=(--set "energy.only=$ONLY"); fi
for s in ${SET:-}; do args+=(--set "$s"); done  # SET="energy.repeats=1 ...": more overrides (the dry run's)
# A part ends by itself (energy.part_seconds); should the estimates be far off, SIGINT at STOP_AFTER_S
# stops it anyway (KILL 10 s later), keeping every finished unit, so the state below is still saved
# within the device's 10-minute command limit.
rc=0
timeout -k 10 -s INT "${STOP_AFTER_S:-540}" "$PY" -m metabolic run "${args[@]}" || rc=$?
if [ "$rc" -ne 0 ]; then echo "!! the run ended with status $rc (124/130/137: stopped at ${STOP_AFTER_S:-540} s); its kept units are saved below"; fi

if [ "${BENCH:-0}" = 1 ]; then
  "$PY" benchmarks/energy_meter.py | tee "$results/energy_meter_benchmark.txt"
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/etokens-state.tgz" -C "$results" --exclude='.*.lock' .
  echo "kept units saved to \$OUT/etokens-state.tgz: carry it back as $STATE for the next call"
fi

# this profile's grid on this GPU: the finished folder, else the partial one with the rows so far
folder=$(ls -td "$results"/*/ 2>/dev/null | head -1 || true)
folder=${folder%/}
GPU=$(gpu_slug)
dest="$RESULTS/etokens/$GPU"
mkdir -p "$dest"
if [ -n "$folder" ]; then
  for f in rows.jsonl machine.json joule_fit.json manifest.json study_config.json energy_meter_benchmark.txt; do
    if [ -f "$folder/$f" ]; then cp "$folder/$f" "$dest/"; fi
  done
  if [ -f "$results/energy_meter_benchmark.txt" ]; then cp "$results/energy_meter_benchmark.txt" "$dest/"; fi
fi
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 137 ]; then exit "$rc"; fi
if [ -z "$folder" ] || [[ "$folder" == *.partial ]]; then status="grid unfinished"; else status="grid complete"; fi
"$PY" -m metabolic.report.gpu_results summarise etokens "$dest" --status "$status" --cap "${STOP_AFTER_S:-540}" \
  --elapsed "$SECONDS" --profile "$PROFILE" --device-name "$GPU_NAME" "${args[@]:4}"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/etokens.tgz" -C "$RESULTS" "etokens/$GPU"; fi
if [ "$status" = "grid unfinished" ]; then
  echo "grid unfinished: $(wc -l < "$dest/rows.jsonl" 2>/dev/null || echo 0) rows so far in $dest/rows.jsonl; call this script again (with the state carried back) to measure the next part"
  exit 0
fi
"$PY" - "$dest/rows.jsonl" <<'PY'
import sys
from metabolic.energy.measurement import read_rows, summarise, window_resolution_note
rows = read_rows(sys.argv[1])
print(f"{'model':<20} {'path':<8} {'task':<15} {'B':>3} {'J/query':>9} {'active':>28} {'Wh/1k out':>10} {'tok/s':>8}")
for t in summarise(rows):
    print(f"{t['model'][:20]:<20} {t['path']:<8} {t['task']:<15} {t['batch_size']:>3} {t['total_j'] or float('nan'):>9.3g} "
          f"{t['active_text']:>28} {t['e_out_wh'] or float('nan'):>10.3g} {t['output_tokens_per_s']:>8.0f}")
print(window_resolution_note(rows))
PY
echo "grid complete: $dest/ (commit it; with the device tool: tar xzf <files_at>/etokens.tgz -C results)"
