# Everything runs from the repo's own virtual environment (.venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# llama.cpp builds from source on the first install (about 11 minutes on 2 cores);
# pip's wheel cache makes every later install take seconds.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test install dev lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed
	@bash scripts/ensure-test-deps.sh $(BIN)

run: install
	$(BIN)/mesh serve --quickstart

test: dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check src tests bench

typecheck: dev
	$(BIN)/mypy

bench: dev
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mesh .pytest_cache .mypy_cache .ruff_cache
