# The course's commands. `make lab` and `make test` each set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Everything the course downloads or writes stays inside the repository.
export NANOVLLM_CACHE_DIR := $(CURDIR)/.cache
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime
export PYDEVD_DISABLE_FILE_VALIDATION := 1

LAB_PORT ?= 8888
# Chapters that `make execute`, `make nbval` and `make figures` work on; default: all of them.
NOTEBOOKS ?= $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help setup model lab test check unit nbval export execute bench clean badges figures browser-test

help:
	@echo "make lab      set up (.venv, embedded model) and open the course in JupyterLab on 127.0.0.1"
	@echo "make test     set up, then run every check: unit tests, strict nbval, export drift, pairs"
	@echo "make execute  re-run every chapter in a fresh kernel and store the outputs"
	@echo "make export   regenerate nanovllm_lib/ from the chapters"
	@echo "make badges   rewrite the Colab/Binder links, Colab setup cells and binder/ from course.toml"
	@echo "make figures  regenerate figures/ by running the chapters that write them"
	@echo "make browser-test  run chapter 04 in JupyterLab in headless Chromium and check what it shows"
	@echo "make bench    run the end-to-end benchmark"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	# Build matplotlib's font cache now, so no chapter prints "generated new fontManager".
	$(PY) -c "import matplotlib.pyplot"
	touch $@

model: $(STAMP)
	$(PY) -c "from nanovllm_lib.embedded_model import main; main()"

setup: model

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser $(ROOT_FLAG) \
		--ServerApp.root_dir=$(CURDIR)/notebooks

export: $(STAMP)
	$(PY) tools/export.py

execute: setup
	$(PY) tools/execute.py $(NOTEBOOKS)

check: $(STAMP)
	$(PY) tools/export.py --check
	$(PY) tools/check_notebooks.py
	$(PY) tools/badges.py --check
	$(PY) tools/figures.py --check

unit: setup
	$(PY) -m pytest -q tests

nbval: setup
	$(PY) -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
		--nbval-sanitize-with tools/nbval_sanitize.cfg $(NOTEBOOKS)

test: setup check unit nbval

badges: $(STAMP)
	$(PY) tools/badges.py

figures: setup
	$(PY) tools/figures.py $(NOTEBOOKS)

# Writes artifacts/bench/ (results.md, results.csv, bench.png); about ten minutes on two quiet CPU cores.
# Options of tools/bench.py go in BENCH_ARGS, for example BENCH_ARGS="--threads 1".
bench: setup
	$(PY) tools/bench.py $(BENCH_ARGS)

# Needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium); saves screenshots in artifacts/.
browser-test: setup
	$(PY) tools/browser_test.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
