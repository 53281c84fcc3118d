# Sourced by scripts/gpu_results.sh (part a) and scripts/cpu_budgets.sh: the files of a budgets run that
# results/budgets/<machine>/ keeps, copied from the run's data folder.

# copy_first SRC... DEST_FILE: the first SRC that exists, when it is this run's (newer than $MARK, the
# part's start) or the run ended well (RC 0, the default)
copy_first() {
  local dest=${!#} src
  for src in "${@:1:$#-1}"; do
    if [ -f "$src" ] && { [ "${RC:-0}" -eq 0 ] || [ "$src" -nt "$MARK" ]; }; then cp "$src" "$dest"; return 0; fi
  done
  return 0
}

# copy_budget_files RUN DEST: timings, pretraining and training metrics, manifests and the evaluation's
# tables of the run in RUN (data/<profile>) into DEST; a cut run's partial metrics where nothing finished
copy_budget_files() {
  local run=$1 dest=$2 v
  copy_first "$run/run_timings.json" "$dest/run_timings.json"
  copy_first "$run/backbone/metrics.jsonl" "$run/backbone.partial/metrics.jsonl" "$dest/pretrain_metrics.jsonl"
  copy_first "$run/backbone/manifest.json" "$dest/backbone_manifest.json"
  copy_first "$run/csc/manifest.json" "$dest/csc_manifest.json"
  for v in faithful expected-cost; do
    copy_first "$run/train/$v/metrics.jsonl" "$run/train/$v.partial/metrics.jsonl" "$dest/train_${v}_metrics.jsonl"
    copy_first "$run/train/$v/selection.json" "$dest/train_${v}_selection.json"
  done
  copy_first "$run/evaluation/tables.json" "$dest/tables.json"
  # five generations per table and level: the texts behind the numbers (the whole generations.jsonl is MBs)
  if [ -f "$run/evaluation/generations.jsonl" ] && { [ "${RC:-0}" -eq 0 ] || [ "$run/evaluation/generations.jsonl" -nt "$MARK" ]; }; then
    PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" "${PY:-python3}" -m metabolic.report.gpu_results examples \
      "$run/evaluation/generations.jsonl" "$dest/examples.jsonl"
  fi
}
