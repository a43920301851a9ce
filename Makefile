# The README's two commands:  `make demo`  and  `make test`.
# Both set everything up first (a virtualenv in .venv with torch, ray and synctrain).
#
# torch is installed *before* the project so that the bare `torch` requirement is already
# satisfied: on a machine with no torch, pip would otherwise pull a multi-GB CUDA build.
# If the Python you run make with already has torch, the venv sees it (system site packages)
# and keeps it.

PYTHON ?= python3
VENV   ?= .venv
TORCH_VERSION ?= 2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.synctrain-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench benchmarks-doc bench-all-quick lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@set -e; \
	if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "[setup] using the torch already installed for $(PYTHON)"; \
	  [ -x $(BIN)/python ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  [ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -c "import torch" >/dev/null 2>&1 || \
	    $(BIN)/pip install --disable-pip-version-check "torch==$(TORCH_VERSION)"; \
	fi; \
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test,bench]"; \
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_sync.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

# docs/benchmarks.md from the published results in benchmarks/results (runs nothing)
benchmarks-doc: $(STAMP)
	$(BIN)/synctrain bench all --no-run

# every benchmark at smoke size, into benchmarks/results/quick (and its benchmarks.md)
bench-all-quick: $(STAMP)
	$(BIN)/synctrain bench all --quick

lint: $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/ruff check synctrain coordinator tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
