# Each target installs what it needs, so `make demo` and `make test` work on a fresh machine.
PY ?= python3
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install test test-all lint demo bench

# Where no torch is installed, take the CPU build first (an unpinned torch pulls several GB of CUDA).
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,plot]"

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(PY) -m ruff check .

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) benchmarks/attention.py
