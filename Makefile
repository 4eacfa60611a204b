# onemall-pl: `make run` (the whole pipeline on the embedded tiny world) and `make test`.
# Both create .venv and install what they need on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= synth
PRESET ?= tiny
SEED ?= 0
DATA_DIR ?= data/$(DATASET)
ART_DIR ?= artifacts
PYTEST_ARGS ?=
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast run data bench clean help

help:
	@echo "make run        the main job on the embedded world ($(PRESET) preset)"
	@echo "make test       install if needed, run the tests"
	@echo "make data       build data/$(DATASET) (DATASET=synth|ml100k, PRESET=tiny|small|medium|large)"
	@echo "make bench      print the benchmark figures"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package's requirements or the pins change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

$(DATA_DIR)/dataset.json: | install
ifeq ($(DATASET),synth)
	$(BIN)/onemall data synth --out $(DATA_DIR) --preset $(PRESET) --seed $(SEED)
else ifeq ($(DATASET),ml100k)
	$(BIN)/onemall data ml100k --out $(DATA_DIR)
else
	@echo "DATASET=$(DATASET): build it with 'onemall data import' first" && exit 2
endif
	$(BIN)/onemall data build $(DATA_DIR)

data: $(DATA_DIR)/dataset.json

run: install data
	@echo "dataset ready in $(DATA_DIR) (later stages join this target as they land)"

bench: install
	$(BIN)/onemall bench data

clean:
	rm -rf artifacts lightning_logs runs
