# Two commands for a newcomer:  `make demo` (train the demo DeiT with MaxSup)  and  `make test`.
# Each sets up what it needs (.venv with pinned requirements) and is quick when already set up.
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
BASE_STAMP := $(VENV)/.base-installed
SEG_STAMP  := $(VENV)/.seg-installed
FAST_STAMP := $(VENV)/.fast-installed
PILLOW_SIMD ?= 1
PYTEST_ARGS ?=

.PHONY: setup setup-seg demo test test-fast bench mutation clean

setup: $(BASE_STAMP) $(FAST_STAMP)

$(BASE_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	touch $@

# Optional input-pipeline speed-ups (docs/data.md, "Data loading speed"): simplejpeg (wheel) and pillow-simd (built from
# source, ~25 s). Without them everything works, slower. `make setup PILLOW_SIMD=0` keeps stock Pillow.
$(FAST_STAMP): $(BASE_STAMP) requirements/fast.txt requirements/pillow-simd.txt
	$(PIP) install -r requirements/fast.txt || echo "optional simplejpeg not installed: PIL decodes JPEGs"
	if [ "$(PILLOW_SIMD)" = 1 ]; then bash scripts/install_pillow_simd.sh $(PY) || \
	    echo "optional pillow-simd did not build: stock Pillow stays (same augmentations, slower)"; fi
	touch $@

# mmcv 2.1.0 has no wheel for this torch: build it from source WITH ops (~34 CPU-minutes: ~17 min on 2 free
# cores, once; pip caches the wheel). mmcv-lite does not work: mmsegmentation imports mmcv.ops.
setup-seg: $(SEG_STAMP)

$(SEG_STAMP): $(BASE_STAMP) requirements/segmentation.txt
	$(PIP) install 'setuptools<70' wheel ninja
	$(PY) -c "import mmcv.ops" 2>/dev/null || MMCV_WITH_OPS=1 $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install -r requirements/segmentation.txt
	touch $@

demo: setup
	PYTHON=$(PY) bash scripts/train_with_MaxSup.sh

test: setup setup-seg
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not segmentation" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.bench_loss
	$(PY) -m benchmarks.bench_train_step
	$(PY) -m benchmarks.bench_input_pipeline

# Mutation testing of the core modules with mutmut (not in CI: hours on 2 cores; results are kept in mutants/
# and reused for unchanged functions). MUTANTS='deit.metrics*' limits a run; the report goes to docs/mutation.md.
# SAMPLE='60 deit/main.py data/zip_index.py' runs a seeded uniform sample of 60 mutants of each module named
# (tools/mutation_sample.py): an unbiased score, with its interval, where the whole module would take hours.
# One torch thread: mutmut forks a worker per mutant, and a forked OpenMP pool can deadlock (a false "timeout").
MUTANTS ?=
SAMPLE ?=
mutation: setup setup-seg
	set -f; OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m mutmut run --max-children $$(nproc) $(MUTANTS) \
	    $(if $(SAMPLE),$$($(PY) -m tools.mutation_sample --per-module $(SAMPLE)))
	$(PY) -m tools.mutation_report --out docs/mutation.md --previous docs/mutation.md \
	    --command "make mutation$(if $(MUTANTS), MUTANTS='$(MUTANTS)')$(if $(SAMPLE), SAMPLE='$(SAMPLE)')"

clean:
	rm -rf $(VENV) output .pytest_cache
