# Two commands matter on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv demo test lint typecheck unit integration e2e image image-test constraints bench clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

venv: $(BIN)/.installed

## A real chunked backfill on a local PostgreSQL (or $$DATABASE_URL) with demo data.
demo: venv
	$(BIN)/dbt-backfill demo

## Everything CI runs: lint, types, the image, and the whole test suite (real PostgreSQL, real dbt).
test: venv lint typecheck image
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check operator scripts tests benchmarks
	$(BIN)/ruff format --check operator scripts tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

## The container image, built with podman into local storage (layers and base cached).
image:
	deploy/image/build.sh

## The tests that build on the image: run it read-only as 10001, run a chunk in it.
image-test: venv image
	$(BIN)/pytest tests/image $(PYTEST_ARGS)

## Re-resolve deploy/image/constraints.txt with hashes (UPGRADE=1 to move every pin).
constraints:
	deploy/image/compile-constraints.sh

## Benchmarks write their numbers to benchmarks/results/ (quoted in the README).
bench: venv
	$(BIN)/python -m benchmarks.backfill_speed
	$(BIN)/python -m benchmarks.operator_api

clean:
	rm -rf $(VENV) analytics/target analytics/logs .mypy_cache .ruff_cache .pytest_cache .hypothesis
