# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the package. Without a CUDA GPU the set-up installs
# the CPU build of torch first (pinned: an unpinned torch would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CPU_TORCH ?= torch==2.13.0

.PHONY: setup demo test test-all mutants lint bench bench-lavis lavis-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch>=2.4"; \
	else \
		$(BIN)/pip install -q "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# --durations: the slowest tests named at the end of each run (the suite's time budget: ~15 min)
test: $(STAMP)
	$(BIN)/pytest -q --durations=15

test-all: $(STAMP)
	$(BIN)/pytest -q -m ""

# Mutation check (outside CI, not part of make test): one deliberate bug at a time in a scratch
# copy; fails when the tests that target a bug still pass. --full: the whole suite per bug (slow).
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# LAVIS 1.0.2 beside ours: its own environment (it needs transformers 4.33), then the stage-1
# step benchmark with LAVIS's step timed in the same rounds as ours.
LAVIS_VENV := .venv-lavis
LAVIS_STAMP := $(LAVIS_VENV)/.installed
LAVIS_NO_DEPS ?= salesforce-lavis==1.0.2 timm==0.4.12 torchvision==0.28.0

lavis-env: $(LAVIS_STAMP)

$(LAVIS_STAMP): bench/lavis-requirements.txt
	@test -x $(LAVIS_VENV)/bin/python || $(PYTHON) -m venv $(LAVIS_VENV)
	$(LAVIS_VENV)/bin/pip install -q "$(CPU_TORCH)"
	$(LAVIS_VENV)/bin/pip install -q --no-deps $(LAVIS_NO_DEPS)
	$(LAVIS_VENV)/bin/pip install -q -r bench/lavis-requirements.txt
	@touch $@

bench-lavis: $(STAMP) $(LAVIS_STAMP)
	$(BIN)/python -m bench.stage1_step --lavis-python $(LAVIS_VENV)/bin/python --format markdown

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
