# Sourced by scripts/gpu_*.sh (run from the repository root): what every GPU run shares.
# ensure_zeus installs zeus (the energy meter's library) offline from the carried .assets/wheels when the
# GPU image lacks it (scripts/pack-zeus-wheels, once on the session's side).
# Sets PY, RESULTS (where results/<part>/<gpu>/ go: results/ unless given) and DRY_RUN; exports PYTHONPATH
# (the checkout's lib/: the GPU image has no installed package), HF_HUB_OFFLINE (no network there),
# PYTHONUNBUFFERED and METABOLIC_ASSETS: as given, else the carried .assets tarball
# (../shared/scripts/pack-device-assets), else shared/data in or beside the checkout.
# DRY_RUN=1 is the CPU rehearsal of a GPU script (tests/test_gpu_results.py): no CUDA or NVML check, and
# the GPU's folder name is `cpu-dry-run`.
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-results}
DRY_RUN=${DRY_RUN:-0}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/lib"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
if [ -z "${METABOLIC_ASSETS:-}" ] && [ -f .assets/assets.tar.gz ]; then
  mkdir -p /tmp/assets && tar xzf .assets/assets.tar.gz -C /tmp/assets && export METABOLIC_ASSETS=/tmp/assets
fi
if [ -z "${METABOLIC_ASSETS:-}" ]; then
  for d in "$PWD/shared/data" "$PWD/../shared/data"; do [ -d "$d" ] && export METABOLIC_ASSETS="$d" && break; done
fi
echo "assets: ${METABOLIC_ASSETS:-<unset: the Hub>}"

# require_cuda HINT: say which GPU this is (and export it as GPU_NAME), or that there is none (with HINT:
# what to run instead) and exit 1
require_cuda() {
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: no CUDA check"; export GPU_NAME="cpu (dry run)"; return 0; fi
  GPU_NAME=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))") \
    || { echo "no CUDA GPU on this machine: $1"; exit 1; }
  export GPU_NAME
  echo "GPU: $GPU_NAME"
}

# require_nvml HINT: the same through NVML (energy needs it); keeps a GPU_NAME given by the caller
require_nvml() {
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: no NVML check"; export GPU_NAME=${GPU_NAME:-"cpu (dry run)"}; return 0; fi
  local name
  name=$("$PY" -c "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))") \
    || { echo "no NVIDIA GPU/NVML on this machine: $1"; exit 1; }
  export GPU_NAME=${GPU_NAME:-$name}
  echo "GPU: $name"
}

# gpu_slug: the GPU's name (GPU_NAME, set by require_cuda or require_nvml) as a folder name under
# results/<part>/, e.g. nvidia-h100-80gb-hbm3; `cpu-dry-run` in a dry run
gpu_slug() {
  if [ "$DRY_RUN" = 1 ]; then echo "cpu-dry-run"; return 0; fi
  echo "$GPU_NAME" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-+//; s/-+$//' | tr '[:upper:]' '[:lower:]'
}

# ensure_zeus: make `import zeus.monitor` work (metabolic.energy.meter) on a GPU image without zeus and
# without network: each wheel in .assets/wheels (scripts/pack-zeus-wheels: zeus, httpx, idna) whose module the
# image cannot import is installed with --no-index --no-deps into $PYDEPS (/tmp/pydeps), appended to
# PYTHONPATH, so the image's own packages are never replaced. Says what it installed; 1 when zeus stays missing.
ensure_zeus() {
  if "$PY" -c "import zeus.monitor" 2>/dev/null; then return 0; fi
  local wheels=.assets/wheels whl module
  if ! ls "$wheels"/zeus-*.whl >/dev/null 2>&1; then
    echo "zeus is not importable here and $wheels holds no zeus wheel: run scripts/pack-zeus-wheels on the session's side and carry .assets"
    return 1
  fi
  PYDEPS=${PYDEPS:-/tmp/pydeps}
  mkdir -p "$PYDEPS"
  export PYTHONPATH="$PYTHONPATH:$PYDEPS"
  for whl in "$wheels"/*.whl; do
    module=$(basename "$whl"); module=${module%%-*}
    if "$PY" -c "import $module" 2>/dev/null; then continue; fi
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --no-index --no-deps --target "$PYDEPS" "$whl" \
      || "$PY" -m zipfile -e "$whl" "$PYDEPS"
    echo "installed $(basename "$whl") into $PYDEPS (offline)"
  done
  "$PY" -c "import zeus.monitor" || { echo "zeus is still not importable (above: the module it lacks)"; return 1; }
}
