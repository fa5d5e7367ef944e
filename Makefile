# One command sets everything up and runs the main job; one sets up and runs the tests.
#   make run    -> virtual env, pinned dependencies, embedded assets, then the main job
#   make test   -> the same set-up, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS_STAMP := $(VENV)/.assets

.PHONY: setup assets run test lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(STAMP)

$(ASSETS_STAMP): $(STAMP) models/assets.py
	$(PY) -m models.assets
	touch $@

assets: $(ASSETS_STAMP)

run: assets
	$(PY) -m objectives.evaluate --model smollm2-135m --methods none,pi,ntk,yarn --lengths 8192,16384 --samples 1

test: assets
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: assets
	$(PY) benchmarks/baselines.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
