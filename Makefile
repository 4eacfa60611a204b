# onemall-pl: `make run` (the whole pipeline on the embedded tiny world) and `make test`.
# Both create .venv and install what they need on first use.
#
#   make data tokenizer pretrain reward rl evaluate report   one target per stage
#   make run                                                 all of them, DATASET=synth PRESET=tiny
#   make paper                                               every paper table at the chosen scale
#   make bench                                               benchmark figures
#
# DATASET=synth|ml100k|<name of a folder under data/>, PRESET=micro|tiny|paper (the stage configs
# configs/<stage>/$(PRESET).yaml; the world's size follows PRESET for synth; micro runs the tiny
# configs on the micro world, and STAGE_ARGS=--trainer.max_steps=3 cuts every stage to a smoke test,
# as tests/test_pipeline.py does). Each stage target
# is its artifact's manifest.json: it reruns only when its config or its upstream changed, and a
# killed run resumes from its last checkpoint (`fit --ckpt_path last`) when rerun.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ONEMALL := $(BIN)/onemall
DATASET ?= synth
PRESET ?= tiny
SEED ?= 0
DATA_DIR ?= data/$(DATASET)
ART_ROOT ?= artifacts
RUNS_ROOT ?= runs
ART := $(ART_ROOT)/$(DATASET)
RUNS := $(RUNS_ROOT)/$(DATASET)
# world size of the simulator for each preset (paper-scale configs train on the medium world)
WORLD_PRESET ?= $(if $(filter micro tiny small medium large,$(PRESET)),$(PRESET),medium)
# stage configs: configs/<stage>/<DATASET>.yaml where one exists (ml100k), else <CONFIG_PRESET>.yaml, else
# tiny.yaml (the micro world has no configs of its own: it runs the tiny ones, cut by STAGE_ARGS)
CONFIG_PRESET ?= $(PRESET)
# extra LightningCLI arguments for every stage's fit and export, e.g. STAGE_ARGS=--trainer.max_steps=4
STAGE_ARGS ?=
PYTEST_ARGS ?=
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# one intra-op thread per process (torchrun's default too): on a shared or loaded CPU, torch's
# multi-thread pool spins against other jobs and runs several times slower (docs/decisions.md)
export OMP_NUM_THREADS ?= 1

.PHONY: help install test test-fast run data tokenizer quantize pretrain reward rl baselines evaluate report \
        paper bench clean clean-runs

help:
	@echo "make run        the whole pipeline on the embedded world (DATASET=$(DATASET) PRESET=$(PRESET))"
	@echo "make test       install if needed, run the tests (what CI runs)"
	@echo "make data | tokenizer | pretrain | reward | rl | evaluate | report   one stage (and what it needs)"
	@echo "make paper      every paper table at the chosen scale, then the report"
	@echo "make bench      print the benchmark figures"

# ---------------------------------------------------------------------------- install
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

# ---------------------------------------------------------------------------- stages
# $(call fit_export,stage,config,extra args): train (resuming a killed run of the same inputs),
# then write the artifact. A run directory older than any prerequisite is stale: start afresh.
define fit_export
	@if [ -d $(RUNS)/$(1) ]; then for p in $(filter-out install,$^); do \
	  if [ "$$p" -nt $(RUNS)/$(1)/checkpoints/last.ckpt ]; then echo "inputs of $(1) changed: new run"; \
	  rm -rf $(RUNS)/$(1); break; fi; done; fi
	$(ONEMALL) $(firstword $(subst _, ,$(1))) fit -c $(2) --trainer.default_root_dir $(RUNS)/$(1) $(3) $(STAGE_ARGS) --ckpt_path last
	$(ONEMALL) $(firstword $(subst _, ,$(1))) export -c $(2) --trainer.default_root_dir $(RUNS)/$(1) $(3) $(STAGE_ARGS)
endef
DATA_ARGS = --data.data_dir $(DATA_DIR) --model.artifacts_root $(ART_ROOT)
cfg = $(firstword $(wildcard configs/$(1)/$(DATASET)$(2).yaml configs/$(1)/$(CONFIG_PRESET)$(2).yaml) configs/$(1)/tiny$(2).yaml)

$(DATA_DIR)/dataset.json: | install
ifeq ($(DATASET),synth)
	$(ONEMALL) data synth --out $(DATA_DIR) --preset $(WORLD_PRESET) --seed $(SEED)
else ifeq ($(DATASET),ml100k)
	$(ONEMALL) data ml100k --out $(DATA_DIR)
else
	@echo "no $(DATA_DIR): create it with 'onemall data import --items ... --events ... --out $(DATA_DIR)'" && exit 2
endif

$(DATA_DIR)/samples: $(DATA_DIR)/dataset.json
	$(ONEMALL) data build $(DATA_DIR)
	touch $@

data: $(DATA_DIR)/samples

$(ART)/tokenizer/manifest.json: $(call cfg,tokenizer) $(DATA_DIR)/samples | install
	$(call fit_export,tokenizer,$(call cfg,tokenizer),$(DATA_ARGS))

$(ART)/quantize/manifest.json: $(call cfg,quantize) $(ART)/tokenizer/manifest.json | install
	$(call fit_export,quantize,$(call cfg,quantize),$(DATA_ARGS) --data.tokenizer_dir $(ART)/tokenizer)

$(ART)/pretrain/manifest.json: $(call cfg,pretrain) $(ART)/quantize/manifest.json | install
	$(call fit_export,pretrain,$(call cfg,pretrain),$(DATA_ARGS) --data.sid_artifact $(ART)/quantize)

$(ART)/reward/manifest.json: $(call cfg,reward) $(DATA_DIR)/samples | install
	$(call fit_export,reward,$(call cfg,reward),$(DATA_ARGS))

$(ART)/rl_dpo/manifest.json: $(call cfg,rl,_dpo) $(ART)/pretrain/manifest.json $(ART)/reward/manifest.json | install
	$(call fit_export,rl_dpo,$(call cfg,rl,_dpo),$(DATA_ARGS) --data.sid_artifact $(ART)/quantize)

$(ART)/rl_grpo/manifest.json: $(call cfg,rl,_grpo) $(ART)/pretrain/manifest.json $(ART)/reward/manifest.json | install
	$(call fit_export,rl_grpo,$(call cfg,rl,_grpo),$(DATA_ARGS) --data.sid_artifact $(ART)/quantize)

# baselines of Table 2 (their data modules take the dataset folder as `dataset`)
BASE_ARGS = --data.dataset $(DATA_DIR)

$(ART)/rqvae/manifest.json: $(call cfg,rqvae) $(ART)/tokenizer/manifest.json | install
	$(call fit_export,rqvae,$(call cfg,rqvae),$(BASE_ARGS) --data.artifacts $(ART_ROOT))

$(ART)/tiger/manifest.json: $(call cfg,tiger) $(ART)/rqvae/manifest.json | install
	$(call fit_export,tiger,$(call cfg,tiger),$(BASE_ARGS) --data.artifacts $(ART_ROOT))

$(ART)/sasrec/manifest.json: $(call cfg,sasrec) $(DATA_DIR)/samples | install
	$(call fit_export,sasrec,$(call cfg,sasrec),$(BASE_ARGS) --model.artifacts $(ART_ROOT))

# evaluate: Table 2 (OneMall vs TIGER vs SASRec) and, with RL policies, Table 4 + the offline A/B
EVAL_POLICIES := $(ART)/rl_dpo/manifest.json $(ART)/rl_grpo/manifest.json
$(ART)/evaluate/manifest.json: $(ART)/pretrain/manifest.json $(ART)/rqvae/manifest.json $(ART)/tiger/manifest.json \
                               $(ART)/sasrec/manifest.json $(EVAL_POLICIES) | install
	$(ONEMALL) evaluate compare --data_dir $(DATA_DIR) --artifacts $(ART_ROOT)
	$(ONEMALL) evaluate rl --data_dir $(DATA_DIR) --sid_artifact $(ART)/quantize

# the paper's tables that need extra runs: Table 1 + 6 (pretrain sweep), Table 5 (quantize ablate)
$(ART)/pretrain_sweep/manifest.json: $(call cfg,pretrain) $(ART)/quantize/manifest.json | install
	$(ONEMALL) pretrain sweep -c $(call cfg,pretrain) --data.data_dir $(DATA_DIR) --model.artifacts_root $(ART_ROOT) \
	  --data.sid_artifact $(ART)/quantize

$(ART)/reports/table5.json: $(ART)/quantize/manifest.json | install
	$(ONEMALL) quantize ablate --artifact $(ART)/quantize

tokenizer: $(ART)/quantize/manifest.json   # stage 1 and stage 2 (semantic IDs)
quantize: $(ART)/quantize/manifest.json
pretrain: $(ART)/pretrain/manifest.json
reward: $(ART)/reward/manifest.json
rl: $(EVAL_POLICIES)
baselines: $(ART)/rqvae/manifest.json $(ART)/tiger/manifest.json $(ART)/sasrec/manifest.json
evaluate: $(ART)/evaluate/manifest.json

report: | install
	$(ONEMALL) report --dataset $(DATASET) --artifacts $(ART_ROOT) --runs $(RUNS_ROOT)

# the stages that do not wait on each other run side by side, JOBS at a time (reward and the
# baselines beside the tokenizer -> quantize -> pretrain -> rl chain); one thread each (OMP_NUM_THREADS)
JOBS ?= 2
run: install
	@$(MAKE) --no-print-directory -j$(JOBS) data tokenizer pretrain reward rl baselines evaluate
	@$(MAKE) --no-print-directory report
	@echo "pipeline done: the report is $(ART)/report/report.md (and report.html beside it)"

paper: run $(ART)/pretrain_sweep/manifest.json $(ART)/reports/table5.json
	@$(MAKE) --no-print-directory report
	@echo "every table: $(ART)/report/report.md"

# ---------------------------------------------------------------------------- benchmarks
bench: install
	$(ONEMALL) bench data
	$(ONEMALL) bench tokenizer
	$(ONEMALL) bench quantize
	$(ONEMALL) bench beam
	$(ONEMALL) bench pretrain

clean-runs:
	rm -rf $(RUNS)

clean:
	rm -rf $(ART) $(RUNS)
