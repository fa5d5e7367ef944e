# One command sets everything up and runs the main job; one sets up and runs the tests.
#   make run    -> virtual env, pinned dependencies, embedded assets, then the main job
#   make test   -> the same set-up, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS_STAMP := $(VENV)/.assets

.PHONY: setup assets postgres chromium run test lint bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# llama-cpp-python ships as source only: pip compiles llama.cpp once (about 15 min on 2 cores) and caches the
# wheel. Built for any AVX2 CPU rather than this one (-march=native), so a cached wheel or a copied virtual
# env runs on every machine of the fleet; the multimodal library, which nothing here uses, is skipped.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_MTMD=OFF

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,postgres,ray,lora,datasets,llamacpp,ruler]'
	touch $@

setup: $(STAMP)

$(ASSETS_STAMP): $(STAMP) models/assets.py
	$(PY) -m models.assets
	touch $@

assets: $(ASSETS_STAMP)

# The PostgreSQL tests start a throwaway server from Debian's binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql package for the storage tests"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql; }

# The report tests open the HTML report in a real headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium package for the report tests"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

run: assets
	$(PY) -m hpo.run --study smollm2_16k

test: assets postgres chromium
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: assets
	$(PY) benchmarks/baselines.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
