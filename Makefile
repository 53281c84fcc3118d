# MetabolicGPT-2 study. Two commands do everything on a fresh machine:
#   make study   - create .venv, install, run every notebook headless (papermill) on PROFILE (smoke)
#   make test    - same install, then pytest: unit, property, integration and nbval over the notebooks
# Offline: METABOLIC_ASSETS=/path/to/shared/data make study

PROFILE ?= smoke
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; a GPU machine passes its own, e.g.
# TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu128'. Installed before the
# package so that the package's unpinned `torch>=2.4` never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# With an offline assets folder, never wait on the Hub.
ifdef METABOLIC_ASSETS
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
endif

.PHONY: study test lab notebooks sync run benchmarks clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[notebooks,test]'
	@# PNG export of plotly figures needs a Chromium; install Debian's where we can (root + apt).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: no chromium: figures are saved as HTML only (install chromium for PNGs)"; }
	touch $(STAMP)

study: $(STAMP)
	$(PY) -m metabolic study --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m ruff check lib tests benchmarks scripts notebooks
	$(PY) -m pytest

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# Run the stages without Jupyter (the GPU image has no Jupyter): make run PROFILE=gpu
run: $(STAMP)
	$(PY) -m metabolic run --profile $(PROFILE)

# Re-pair the notebooks and refresh the outputs stored in notebooks/*.ipynb (what nbval checks).
notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py
	$(PY) -m metabolic study --profile smoke --inplace

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

benchmarks: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b --profile $(PROFILE) || exit 1; done

clean:
	rm -rf data/smoke figures/smoke
