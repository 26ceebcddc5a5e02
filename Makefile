# Two entry points: `make demo` and `make test`. Both create .venv when it is missing and install the
# project into it; nothing else needs to be on the machine but Python 3.11+. `make docs` builds the
# documentation site offline (warnings are errors); `make test` builds it too, in tests/test_docs.py.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The speed comparison needs torch. A pinned CPU build is installed first so that the `bench` extra's
# range is already satisfied (an unpinned torch pulls a multi-GB CUDA build). WITH_TORCH=0 skips it;
# the torch tests then skip with a stated reason.
TORCH_PIN ?= torch==2.13.0
WITH_TORCH ?= 1
# BackPACK and nngeometry declare torchvision, which pulls a multi-GB CUDA torch (and PyPI's
# torchvision does not import beside the CPU torch pinned above), yet neither imports it at run
# time (only BackPACK's MNIST example does). They are installed without their declared
# dependencies; the ones they do import (einops, unfoldNd) are in the `bench` extra.
BENCH_NO_DEPS ?= backpack-for-pytorch==1.7.1 nngeometry==0.4
PYTEST_ARGS ?=

.PHONY: demo test test-exhaustive docs lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ "$(WITH_TORCH)" = "1" ]; then $(PY) -m pip install --quiet "$(TORCH_PIN)" || \
	  echo "warning: $(TORCH_PIN) could not be installed; torch comparisons will be skipped"; fi
	$(PY) -m pip install --quiet -e '.[experiments,tfds,test,docs]'
	if [ "$(WITH_TORCH)" = "1" ] && $(PY) -c 'import torch' 2>/dev/null; then \
	  $(PY) -m pip install --quiet -e '.[bench]' && \
	  $(PY) -m pip install --quiet --no-deps $(BENCH_NO_DEPS); fi
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.main --config experiments/configs/demo.py --workdir runs/demo --overwrite

# A worker that dies has its test rerun once on a fresh worker (pytest-rerunfailures);
# --only-rerun with a pattern that matches nothing keeps every ordinary failure a failure, and
# the summary lists such a test as R. In four full runs from fresh clones, XLA's CPU compiler
# segfaulted in the same test each time (test_calibration's test_explicit_chunk_size_wins,
# compiling a Fisher with a partial last chunk); the test passes alone and in smaller groups,
# and the cause is not known yet.
CRASH_RERUN := --reruns 1 --only-rerun '(?!)'

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --dist worksteal $(CRASH_RERUN) -m "not exhaustive" $(PYTEST_ARGS)

# The reference matrix's whole cross product (tests/test_reference_matrix.py), beyond the entries
# `make test` runs (every family, estimator and path at least once).
test-exhaustive: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m exhaustive $(PYTEST_ARGS)

# -W --keep-going: every warning is an error, all of them reported; -n: every cross-reference
# must resolve. No network: no intersphinx, the tutorial's stored outputs are shown as they are.
docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -n -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(VENV)/.installed
	$(PY) -m benchmarks.compare --out BENCHMARKS.json
	$(PY) -m benchmarks.memory --out MEMORY.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache docs/_build docs/_autosummary build dist
