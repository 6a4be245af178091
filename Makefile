# Each target does its own set-up: a local virtualenv in .venv with the package installed.
# `make demo` installs only what the trainer needs; `make test` adds the test, hf (torch CPU),
# tasks (reasoning-gym, math-verify) and notebook extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[all]"
	touch $@ $(VENV)/.installed-base

## Run the main job: the built-in demo (tiny model, SFT warm start, GRPO on 3 tasks).
demo: $(VENV)/.installed-base
	$(BIN)/jaxgrpo train train.workdir=runs/demo-$$(date +%Y%m%d-%H%M%S)

## Run the whole test suite (what CI runs).
test: $(VENV)/.installed-all
	$(BIN)/ruff check jaxgrpo tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadgroup

## Skip the slow tests.
test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: $(VENV)/.installed-all
	$(BIN)/ruff check jaxgrpo tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
