# Sourced by scripts/gpu_*.sh (run from the repository root): what every GPU run shares.
# Sets PY; exports PYTHONPATH (the checkout's lib/: the GPU image has no installed package), HF_HUB_OFFLINE
# (no network there), PYTHONUNBUFFERED and METABOLIC_ASSETS: as given, else the carried .assets tarball
# (../shared/scripts/pack-device-assets), else shared/data in or beside the checkout.
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/lib"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
if [ -z "${METABOLIC_ASSETS:-}" ] && [ -f .assets/assets.tar.gz ]; then
  mkdir -p /tmp/assets && tar xzf .assets/assets.tar.gz -C /tmp/assets && export METABOLIC_ASSETS=/tmp/assets
fi
if [ -z "${METABOLIC_ASSETS:-}" ]; then
  for d in "$PWD/shared/data" "$PWD/../shared/data"; do [ -d "$d" ] && export METABOLIC_ASSETS="$d" && break; done
fi
echo "assets: ${METABOLIC_ASSETS:-<unset: the Hub>}"

# require_cuda HINT: print the GPU's name, or say there is none (with HINT: what to run instead) and exit 1
require_cuda() {
  "$PY" -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0))" \
    || { echo "no CUDA GPU on this machine: $1"; exit 1; }
}

# gpu_slug: the GPU's name as a folder name under results/<what>/, e.g. nvidia-h100-80gb-hbm3
gpu_slug() {
  "$PY" -c "import torch, re; print(re.sub('[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())"
}
