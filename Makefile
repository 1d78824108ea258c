SHELL := /bin/bash
# `make figures` and `make test` set everything up on first use: a local
# virtual environment in .venv with the project installed (editable).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP_QUIET := -q

.PHONY: setup test figures toy experiments bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -c "import study, toy, torch, torchvision, timm"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Every figure, from the stored (committed) results: no training.
figures: $(STAMP)
	$(BIN)/python -m study.figures --results results --out figures

# The CPU studies (papermill sweeps) that write results/*.csv; points already
# done under runs/ are skipped, so an interrupted `make experiments` resumes.
experiments: $(STAMP)
	$(BIN)/python -m study sweep experiments/sweeps/mask_strength_cpu.yaml
	$(BIN)/python -m study sweep experiments/sweeps/efficiency_cpu.yaml
	$(BIN)/python -m study sweep experiments/sweeps/noise_block_cpu.yaml
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_tradeoff_cpu.yaml
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_cpu.yaml
	$(BIN)/python -m study sweep experiments/sweeps/synthetic_ratio_cpu.yaml

# Training-step benchmarks (needs the bench extra: transformers).
bench: $(STAMP)
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[dev,bench]'
	$(BIN)/python -m study bench --config experiments/configs/cpu-small.yaml --out results/bench/cpu-small.json

# The full toy (more seeds, finer grid; < 15 minutes on 2 cores).
toy: $(STAMP)
	$(BIN)/python toy/regression_to_mean.py --out results/toy --figures figures

clean-venv:
	rm -rf $(VENV)
