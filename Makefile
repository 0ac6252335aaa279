# Every target creates .venv when it is missing (or when pyproject.toml changed) and installs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.within-installed
# torch first, as the pinned pair this machine has on disk; the rest from pyproject.toml
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: venv train serve test test-all bench format clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

## train the default model on the embedded simulator; extra Hydra overrides via ARGS="..."
train: venv
	$(PY) train.py $(ARGS)

## serve a bundle over HTTP on 127.0.0.1: make serve ARGS="bundle=outputs/train/runs/<ts>/bundle [port=8000]"
serve: venv
	$(PY) serve.py $(ARGS)

## the default test suite (slow tests excluded)
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

## everything, slow tests (DDP, sweeps) included
test-all: venv
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

## run every benchmark module (python -m benchmarks.<name>, not common); each rewrites benchmarks/results/<name>.*
bench: venv
	@set -e; for b in $(filter-out __init__ common,$(basename $(notdir $(wildcard benchmarks/*.py)))); do \
		echo "== python -m benchmarks.$$b"; $(PY) -m benchmarks.$$b; done

format: venv
	$(PY) -m ruff format within tests benchmarks train.py evaluate.py
	$(PY) -m ruff check --fix within tests benchmarks train.py evaluate.py

clean:
	rm -rf outputs/train outputs/evaluate outputs/debug .pytest_cache
