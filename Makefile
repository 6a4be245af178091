# Each target does its own set-up: a local virtualenv in .venv with the package installed.
# `make demo` installs only what the trainer needs; `make test` adds the test, hf (torch CPU),
# tasks (reasoning-gym, math-verify) and notebook extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint clean

# Quiet steps (venv, pip -q) print a line every 10 s while they run.
PROGRESS := sh scripts/with_progress.sh

$(BIN)/python:
	$(PROGRESS) "creating the virtualenv $(VENV) (first run only)" $(PY) -m venv $(VENV)
	$(PROGRESS) "upgrading pip in $(VENV)" $(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PROGRESS) "installing jaxgrpo and its dependencies (jax, flax, ...: about 1 GB, a minute \
	on the first run)" $(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(PROGRESS) "installing jaxgrpo with every extra (test, hf with torch CPU, tasks, \
	notebooks: a few minutes on the first run)" $(BIN)/pip install -q -e ".[all]"
	touch $@ $(VENV)/.installed-base

## Run the main job: the built-in demo (tiny model, SFT warm start, GRPO on 3 tasks).
demo:
	@echo "[make] jaxgrpo demo: set-up first (a virtualenv in $(VENV), skipped when present), \
	then about 7 minutes of training on a 2-core CPU"
	@$(MAKE) --no-print-directory $(VENV)/.installed-base
	$(BIN)/jaxgrpo train train.workdir=runs/demo-$$(date +%Y%m%d-%H%M%S)

## Run the whole test suite (what CI runs).
test: $(VENV)/.installed-all
	$(BIN)/ruff check jaxgrpo tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25

## Skip the slow tests.
test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: $(VENV)/.installed-all
	$(BIN)/ruff check jaxgrpo tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
