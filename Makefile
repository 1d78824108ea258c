SHELL := /bin/bash
# `make figures` and `make test` set everything up on first use: a local
# virtual environment in .venv with the project installed (editable).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP_QUIET := -q

.PHONY: setup test figures toy experiments clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -c "import study, toy, torch, torchvision, timm"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Every figure, from the stored results (no training).
figures: $(STAMP)
	@test -f results/toy/toy_results.csv || $(BIN)/python toy/regression_to_mean.py --quick --out results/toy --figures figures
	$(BIN)/python toy/regression_to_mean.py --plot-only --out results/toy --figures figures
	$(BIN)/python -m study.figures.masks --out figures

# The full toy (more seeds, finer grid; < 15 minutes on 2 cores).
toy: $(STAMP)
	$(BIN)/python toy/regression_to_mean.py --out results/toy --figures figures

clean-venv:
	rm -rf $(VENV)
