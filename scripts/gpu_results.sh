#!/usr/bin/env bash
# The study's GPU results in one device call of at most 9 minutes (issue 24). Four parts, in this order,
# each under a time cap, each saved to $RESULTS/<part>/<gpu>/ (results/ unless given) and to $OUT the
# moment it ends, so a call cut short still returns what it measured:
#
#   a. budgets         the gpu profile, corpus -> pretrain -> prior -> csc -> train -> evaluate, with the
#                      overrides in A_SET: Table I, the verified controller (Hit@10 per level for N = 1, 2,
#                      4, 8, both CSC scales), judge perplexity, labels and seconds per generation, the cost
#                      model's Spearman and R²; the csc stage labels 2,200 texts of <= 256 tokens
#   b. csc_throughput  the CSC labeller (fp32, tf32, fp16) against naive SentenceTransformer.encode on texts
#                      of exactly 256 tokens: slices of B_SIZES texts, growing while the next one is predicted
#                      to fit (the largest that ran is the one reported; 2,000 if time allows)
#   c. etokens         a slice of the gpu e-token grid (C_ONLY: gpu-6x384 and gpt2-small-scratch, chat and
#                      creative, batch 1 and 32, both serving paths), then the joule fit when
#                      C_JOULE_FIT_MIN_S are left, then more of the grid in its order when C_REST_MIN_S are left;
#                      the rest in later calls of scripts/gpu_etokens.sh (carry $OUT/etokens-state.tgz back)
#   d. overhead        the MetabolicGPT-2 training step and budgeted decoding against their plain baselines
#                      (6 x 384 with random weights, bf16 autocast), with torch.profiler tables
#
# Caps (seconds, CAP_A..CAP_D): part X must end by the sum of the caps up to X, counted from the
# script's start, so a part that ends early leaves its time to the next one and the whole call ends
# within the caps' sum (510 s) plus packing. A part cut at its cap (SIGINT, KILL 10 s later) still writes
# its summary.json with what it finished; artefacts are built resumably in data/<profile>/<stage>.partial/.
#
# With the device tool (once, on the session's side: ../shared/scripts/pack-device-assets, then
# scripts/pack-zeus-wheels: the image has no zeus and no network, so part c installs it from .assets/wheels):
#   run(command="bash scripts/gpu_results.sh", carry=[".assets"], timeout_s=600)
# then on the session's side, from the call's files_at folder:
#   for p in budgets csc_throughput etokens overhead; do tar xzf <files_at>/$p.tgz -C results; done
#   git add results/      # summary.txt is the call's log; overhead-profiles.tgz holds the Chrome traces
#   mkdir -p .etokens-state && cp <files_at>/etokens-state.tgz .etokens-state/state.tgz   # the rest of the grid
#
# PARTS="budgets overhead" runs only those parts; CAP_A..CAP_D, A_SET, B_SIZES, C_ONLY, C_SET (overrides of the
# grid) and C_JOULE_FIT_MIN_S change the settings above. On a GPU machine of your own, without $OUT, the results stay in results/.
# DRY_RUN=1 runs the same commands on the CPU (tests/test_gpu_results.py): the smoke profile with tiny
# settings, no CUDA check, results under $RESULTS (give a temporary folder).
set -uo pipefail  # not -e: a part that fails must not stop the next

here=$(dirname "$0")
source "$here/gpu_common.sh"
source "$here/budget_files.sh"
# C_CALIB_MIN_S was renamed ("calibration" alone is the proxy <-> CSC map): an old setting fails, never ignored
if [ -n "${C_CALIB_MIN_S+x}" ]; then
  echo "gpu_results: C_CALIB_MIN_S was renamed C_JOULE_FIT_MIN_S: use C_JOULE_FIT_MIN_S=$C_CALIB_MIN_S" >&2
  exit 2
fi
PARTS=${PARTS:-"budgets csc_throughput etokens overhead"}
DATA=${METABOLIC_DATA:-data}
export METABOLIC_DATA=$DATA

if [ "$DRY_RUN" = 1 ]; then
  # Never into the repository's results/ and data/ (tiny artefacts would replace the smoke notebooks' own).
  if [ "$RESULTS" = results ]; then RESULTS=$(mktemp -d)/results; fi
  if [ "$DATA" = data ]; then DATA=$(mktemp -d)/data; export METABOLIC_DATA=$DATA; fi
  # The rehearsal checks that every command runs, not its numbers: the machine's own CPU kernels.
  export METABOLIC_NUMERICS=native
  unset MKL_CBWR ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA
  PROFILE=smoke DEVICE=cpu
  TINY="corpus.seq_len=24 corpus.max_train_texts=48 corpus.max_valid_texts=12 backbone.n_layer=1 backbone.n_embd=32
        backbone.n_head=2 backbone.block_size=32 backbone.batch_size=4 backbone.max_steps=2 backbone.warmup_steps=1
        backbone.eval_every=2 backbone.max_eval_blocks=2 backbone.checkpoint_every=2 train.batch_size=2"
  A_SET=${A_SET:-"$TINY csc.max_sequences=4 csc.max_valid_sequences=2 train.epochs=1 generation.n_valid_prompts=0
        generation.max_new_tokens=4 generation.verified_max_new_tokens=8 generation.verified_candidates=1,2
        generation.verified_scales=raw,length"}
  B_SIZES=${B_SIZES:-"2"} B_TOKENS=16 B_START_S=5
  C_ONLY=${C_ONLY:-"cell-tiny-*-chat-b1"} C_START_S=5 C_JOULE_FIT_MIN_S=${C_JOULE_FIT_MIN_S:-0} C_REST_MIN_S=${C_REST_MIN_S:-0}
  C_SET=${C_SET:-"energy.batch_sizes=1 energy.repeats=1"}  # smoke's batch 4 / 16 and repeats are notebook 05's
  D_SET=$TINY D_TRAIN="--steps 1 --warmup 1" D_GEN="--batch 2 --repeats 1 --candidates 2 --new-tokens 4"
  D_SET="$D_SET generation.verified_max_new_tokens=8"
  CAP_A=${CAP_A:-400} CAP_B=${CAP_B:-200} CAP_C=${CAP_C:-200} CAP_D=${CAP_D:-300}
else
  PROFILE=gpu DEVICE=cuda
  # The gpu profile was sized for "the whole pipeline in about 9 minutes" on an H100 and never run: two
  # overrides keep part a well inside its cap (2 of 3 pretraining epochs; 32 + 1 prompts per level, not 64 + 1).
  A_SET=${A_SET:-"backbone.epochs=2 generation.n_valid_prompts=32"}
  B_SIZES=${B_SIZES:-"100 400 2000"} B_TOKENS=256 B_START_S=20  # imports, corpus, encoder: before the timed work
  C_ONLY=${C_ONLY:-"cell-gpu-6x384-*-chat-b1,cell-gpu-6x384-*-chat-b32,cell-gpu-6x384-*-creative-b1,cell-gpu-6x384-*-creative-b32,cell-gpt2-small-scratch-*-chat-b1,cell-gpt2-small-scratch-*-chat-b32,cell-gpt2-small-scratch-*-creative-b1,cell-gpt2-small-scratch-*-creative-b32"}
  # a process's start before the part clock runs; what the joule fit and the rest of the grid need at least
  C_START_S=25 C_JOULE_FIT_MIN_S=${C_JOULE_FIT_MIN_S:-110} C_REST_MIN_S=${C_REST_MIN_S:-60} C_SET=${C_SET:-}
  D_SET="" D_TRAIN="--steps 20 --warmup 5" D_GEN="--batch 8 --repeats 5 --candidates 4"
  CAP_A=${CAP_A:-290} CAP_B=${CAP_B:-50} CAP_C=${CAP_C:-105} CAP_D=${CAP_D:-65}
fi
export RESULTS  # scripts/gpu_etokens.sh (part c) writes there too
sets() { local s; for s in $1; do printf -- '--set\n%s\n' "$s"; done; }  # "a=1 b=2" -> --set a=1 --set b=2, one per line
mapfile -t A_ARGS < <(sets "$A_SET")
mapfile -t D_ARGS < <(sets "$D_SET")
declare -A CAP=([budgets]=$CAP_A [csc_throughput]=$CAP_B [etokens]=$CAP_C [overhead]=$CAP_D)
declare -A WHAT=(
  [budgets]="profile $PROFILE, corpus -> evaluate${A_SET:+, with $(echo $A_SET | tr ' ' ',')}"
  [csc_throughput]="labeller vs naive encode, texts of $B_TOKENS tokens, slices of $(echo $B_SIZES | tr ' ' '/') texts while they fit"
  [etokens]="e-token slice $C_ONLY; the joule fit if >= ${C_JOULE_FIT_MIN_S} s are left, then the rest of the grid if >= ${C_REST_MIN_S} s"
  [overhead]="training step and budgeted decoding vs plain (scratch weights)"
)

# --- the plan, printed before anything runs -------------------------------------------------------
ORDER="budgets csc_throughput etokens overhead"
declare -A DEADLINE LETTER=([budgets]=a [csc_throughput]=b [etokens]=c [overhead]=d)
end=0
echo "gpu_results: profile $PROFILE; parts in order, each saved to $RESULTS/<part>/<gpu>/${OUT:+ and \$OUT} as it ends"
for p in $ORDER; do
  if [[ " $PARTS " != *" $p "* ]]; then continue; fi
  end=$(( end + CAP[$p] ))
  DEADLINE[$p]=$end
  printf '  %s. %-15s cap %4d s (ends by %4d s): %s\n' "${LETTER[$p]}" "$p" "${CAP[$p]}" "$end" "${WHAT[$p]}"
done
echo "  a part that ends early leaves its time to the next; the run ends within ${end} s, plus packing and at most 10 s of a cut command's exit"
LOG=()  # the call's log for $OUT: the plan, then each part's status and numbers as it ends
if [ -n "${OUT:-}" ]; then LOG=("$OUT/summary.txt") && echo "gpu_results plan: $PARTS; caps a-d ${CAP_A}/${CAP_B}/${CAP_C}/${CAP_D} s" > "$LOG"; fi

require_cuda "this script is for a GPU machine (the CPU rehearsal: DRY_RUN=1 RESULTS=<tmp> OUT=<tmp> bash scripts/gpu_results.sh)"
# the energy meter (part c) is zeus: installed offline from .assets/wheels when the image lacks it; without it
# part c fails and says why, the other parts run
if [[ " $PARTS " == *" etokens "* ]]; then ensure_zeus || echo "!! zeus missing: part c (etokens) will fail"; fi
GPU=$(gpu_slug)
echo "results: $RESULTS/<part>/$GPU/"

left() { echo $(( DEADLINE[$PART] - SECONDS )); }
# capped CMD...: run CMD until the current part's deadline (SIGINT, KILL 10 s later); 124/137 when cut there
capped() {
  local l
  l=$(left)
  if [ "$l" -le 0 ]; then echo "!! $PART: no time left for: $*"; return 124; fi
  timeout -k 10 -s INT "$l" "$@"
}
status_of() {
  case $1 in 0) echo complete ;; 124|130|137) echo "cut at its cap" ;; *) echo "failed (exit $1)" ;; esac
}

part_budgets() {
  local run="$DATA/$PROFILE"
  "$PY" -m metabolic config --profile "$PROFILE" "${A_ARGS[@]}" > "$DEST/study_config.json" || return $?
  capped "$PY" -m metabolic run --profile "$PROFILE" --stages ..evaluate "${A_ARGS[@]}" \
    2>&1 | tee "$DEST/log.txt"
  RC=${PIPESTATUS[0]}
  copy_budget_files "$run" "$DEST"
  return "$RC"
}

part_csc_throughput() {
  local n last_n=0 last_s=0 need t rc=0
  for n in $B_SIZES; do
    if [ "$last_n" -gt 0 ]; then  # the last slice's seconds beyond a process start, scaled to n texts
      need=$(( B_START_S + (last_s > B_START_S ? last_s - B_START_S : 0) * n / last_n ))
      if [ "$need" -gt "$(left)" ]; then
        echo "csc_throughput: $n texts would need about $need s, $(left) s are left: the largest slice is $last_n texts"
        break
      fi
    fi
    t=$SECONDS
    TOKENIZERS_PARALLELISM=true capped "$PY" benchmarks/csc_throughput.py --profile "$PROFILE" --device "$DEVICE" --tokens "$B_TOKENS" \
      --sequences "$n" --repeats 1 --json "$DEST/csc_throughput-$n.json" 2>&1 | tee "$DEST/csc_throughput-$n.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then rm -f "$DEST/csc_throughput-$n.json"; break; fi
    last_n=$n last_s=$(( SECONDS - t ))
  done
  return "$rc"
}

part_etokens() {
  local grid="$DATA/etokens-grid" rc=0 seconds
  # the grid a bare machine sees (no trained MetabolicGPT-2 beside it), so scripts/gpu_etokens.sh resumes it later
  mkdir -p "$grid/$PROFILE"
  if [ -d "$DATA/$PROFILE/corpus" ] && [ ! -e "$grid/$PROFILE/corpus" ]; then
    ln -s "$(cd "$DATA/$PROFILE/corpus" && pwd)" "$grid/$PROFILE/corpus"
  fi
  # the slice; then, with the time left, the joule fit; then the rest of the grid in its order
  local -a only=("$C_ONLY" joule_fit "") need=(0 "$C_JOULE_FIT_MIN_S" "$C_REST_MIN_S") what=(slice "joule fit" rest)
  for i in 0 1 2; do
    seconds=$(( $(left) - C_START_S ))
    if [ "$seconds" -le 0 ] || [ "$(left)" -lt "${need[$i]}" ]; then
      echo "etokens: $(left) s left, not enough for the ${what[$i]}${need[$i]:+ (${need[$i]} s)}"
      if [ "$i" -eq 0 ]; then return 124; else break; fi
    fi
    echo "etokens: the ${what[$i]}, $(left) s left"
    PROFILE=$PROFILE METABOLIC_DATA=$grid ONLY=${only[$i]} PART_SECONDS=$seconds STOP_AFTER_S=$(left) SET=$C_SET \
      bash "$here/gpu_etokens.sh" || { rc=$?; break; }
  done
  return "$rc"
}

part_overhead() {
  local traces="$DATA/overhead-profiles/$GPU" rc=0
  mkdir -p "$traces" "$DEST/profiles"
  # shellcheck disable=SC2086 # D_TRAIN and D_GEN are word lists
  capped "$PY" benchmarks/train_overhead.py --profile "$PROFILE" --device "$DEVICE" --scratch $D_TRAIN "${D_ARGS[@]}" \
    --profile-trace "$traces" --json "$DEST/train_overhead.json" 2>&1 | tee "$DEST/train_overhead.txt"
  rc=${PIPESTATUS[0]}
  # shellcheck disable=SC2086
  capped "$PY" benchmarks/generation_overhead.py --profile "$PROFILE" --device "$DEVICE" --scratch $D_GEN "${D_ARGS[@]}" \
    --profile-trace "$traces" --json "$DEST/generation_overhead.json" 2>&1 | tee "$DEST/generation_overhead.txt"
  local gen=${PIPESTATUS[0]}
  if [ "$gen" -ne 0 ]; then rc=$gen; fi
  cp "$traces"/*.txt "$DEST/profiles/" 2>/dev/null  # the operator tables; the Chrome traces go to $OUT only
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/overhead-profiles.tgz" -C "$DATA/overhead-profiles" "$GPU"; fi
  return "$rc"
}

for PART in $ORDER; do
  if [[ " $PARTS " != *" $PART "* ]]; then continue; fi
  DEST="$RESULTS/$PART/$GPU"
  rm -rf "$DEST" && mkdir -p "$DEST"
  MARK="$DEST/.started" && touch "$MARK"
  start=$SECONDS RC=0
  echo "=== ${LETTER[$PART]}. $PART: cap ${CAP[$PART]} s, $(left) s until its deadline"
  "part_$PART"
  RC=$?
  status=$(status_of "$RC")
  rm -f "$MARK"
  case $PART in
    budgets) settings=("${A_ARGS[@]}") ;;
    etokens) settings=(--set "energy.only=$C_ONLY") ;;
    overhead) settings=("${D_ARGS[@]}") ;;
    *) settings=() ;;
  esac
  lines=$("$PY" -m metabolic.report.gpu_results summarise "$PART" "$DEST" --status "$status" --cap "${CAP[$PART]}" \
    --elapsed $(( SECONDS - start )) --profile "$PROFILE" --device-name "$GPU_NAME" "${settings[@]}" 2>&1)
  printf '=== %s. %s (%s, %d s, at %d s)\n%s\n' "${LETTER[$PART]}" "$PART" "$status" $(( SECONDS - start )) "$SECONDS" "$lines" | tee -a "${LOG[@]}"
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/$PART.tgz" -C "$RESULTS" "$PART/$GPU"; fi
done
echo "gpu_results: done in $SECONDS s${OUT:+; \$OUT holds $(ls "$OUT" | tr '\n' ' ')}"
if [ -n "${OUT:-}" ]; then echo "--- \$OUT/summary.txt"; cat "$OUT/summary.txt"; fi
