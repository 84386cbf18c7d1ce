# Two commands matter on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv demo test lint typecheck unit integration e2e bench clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

venv: $(BIN)/.installed

## A real chunked backfill on a local PostgreSQL (or $$DATABASE_URL) with demo data.
demo: venv
	$(BIN)/dbt-backfill demo

## Everything CI runs: lint, types, and the whole test suite (real PostgreSQL, real dbt).
test: venv lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check operator scripts tests benchmarks localcluster
	$(BIN)/ruff format --check operator scripts tests benchmarks localcluster

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

## Benchmarks write their numbers to benchmarks/results/ (quoted in the README).
bench: venv
	$(BIN)/python -m benchmarks.backfill_speed
	$(BIN)/python -m benchmarks.status_size
	$(BIN)/python -m benchmarks.operator_cluster

clean:
	rm -rf $(VENV) analytics/target analytics/logs .mypy_cache .ruff_cache .pytest_cache .hypothesis
