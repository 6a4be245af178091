# Each target does its own set-up: a local virtualenv in .venv with the package installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all]"
	touch $(STAMP)

## Run the main job: the built-in demo (tiny model, SFT warm start, GRPO on 3 tasks).
demo: $(STAMP)
	$(BIN)/jaxgrpo train

## Run the whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check jaxgrpo tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadgroup

## Skip the slow tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check jaxgrpo tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
