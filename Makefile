# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mal-installed

.PHONY: setup demo test test-fast lint bench figures clean

# PyTorch and a torchvision built for it (detection needs torchvision's compiled ops, which load only beside the torch
# they were built with) before the project, pinned: an unpinned torch pulls the newest CUDA build. x86_64: torch 2.14.1
# + torchvision 0.29.1 (CUDA builds, about 5.5 GB, that run on a CPU); aarch64: 2.9.1 + 0.24.1 (CPU builds).
TORCH_PAIR := $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mal demo

test: setup
	$(BIN)/python -m pytest -q

# the edit loop: everything but the end-to-end tests (quick sweeps, demos, benchmark subprocesses, DDP)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/encoder_speed.py

# every sweep figure of docs/RESULTS.md redrawn from its rows (docs/results/<sweep>.csv), nothing trained
figures: setup
	for f in docs/results/*.csv; do n=$$(basename $$f .csv); \
	  $(BIN)/mal sweep --config $$n --merge $$f --report --no-progress out_dir=runs/figures/$$n > /dev/null && \
	  cp runs/figures/$$n/plot.png docs/figures/sweep_$$n.png && echo "docs/figures/sweep_$$n.png" || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
