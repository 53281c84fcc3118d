# MetabolicGPT-2 study. Two commands do everything on a fresh machine:
#   make study   - create .venv, install, run every notebook headless (papermill) on PROFILE (smoke)
#   make test    - same install, then pytest: unit, property, integration and nbval over the notebooks
# Offline: METABOLIC_ASSETS=/path/to/shared/data make study

PROFILE ?= smoke
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so that the package's `torch>=2.6` is already met and pip
# never picks a build for it. Which build `torch==2.13.0` gives depends on pip's configuration: on
# this project's machines a local CPU wheel (pip's find-links); from the public PyPI index the CUDA
# build (several GB). Pass your own, e.g. a CPU-only machine without a local wheel:
#   make study TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
TORCH_SPEC ?= torch==2.13.0
# Jupyter refuses to run as root (containers) unless told to.
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root)
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

# pytest on PYTEST_WORKERS xdist processes (default 2): the notebooks (nbval) as two ordered groups side by
# side, the browser tests after them, the other tests spread over both (tests/conftest.py, which also makes
# the workers' OpenMP threads sleep rather than spin while they wait: 2 workers x the smoke profile's 2
# pinned threads share 2 cores). On this project's 2-core machine: 577 s of pytest against 770 s in one
# process (DEVELOPMENT.md, Timings). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check lib tests benchmarks scripts notebooks
	$(PY) -m pytest $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS))

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Run the stages without Jupyter (the GPU image has no Jupyter): make run PROFILE=gpu
run: $(STAMP)
	$(PY) -m metabolic run --profile $(PROFILE)

# Re-pair the notebooks and refresh the outputs stored in notebooks/*.ipynb (what nbval checks).
notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py
	$(PY) -m metabolic study --profile smoke --inplace

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

# Every benchmark takes --profile; energy_meter.py says so and exits 0 on a machine without NVML.
benchmarks: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b --profile $(PROFILE)"; $(PY) $$b --profile $(PROFILE) || exit 1; done

clean:
	rm -rf data/smoke figures/smoke
