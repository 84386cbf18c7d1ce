# Two commands matter on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# The machine's cache outside the repo (a fresh clone reuses it): the pinned Kubernetes binaries
# (localcluster/build.sh caches them per version) and mypy's cache (a cold mypy costs ~1 min of CPU,
# a warm one ~1 s; mypy checks each cached module against its source's hash, so a clone elsewhere or
# another branch never gets a stale result).
CACHE_DIR := $(or $(DBT_BACKFILL_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dbt-backfill)
CLUSTER_BIN := $(shell awk '$$1 == "k8s.io/kubernetes" && $$2 ~ /^v/ {print $$2}' localcluster/go.mod)
CLUSTER_BIN_DIR := $(CACHE_DIR)/k8s/$(CLUSTER_BIN)
export MYPY_CACHE_DIR ?= $(CACHE_DIR)/mypy
# The node agent's container runtime for `make cluster-up`: podman (Pods run in their images) when
# it is installed, else host processes (`make cluster-up RUNTIME=host` to choose).
RUNTIME ?= $(if $(shell command -v podman),podman,host)
# The built kubectl (same version as the API server) comes first for everything make runs.
export PATH := $(CLUSTER_BIN_DIR):$(PATH)

.PHONY: venv demo demo-db demo-db-down test lint typecheck unit integration e2e bench clean cluster-bin cluster-up cluster-down image image-test constraints

# The venv's own pip (Python 3.11's, 23.x) installs the editable project as it is: upgrading it
# first cost CI ~10 s of download every run.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

venv: $(BIN)/.installed

## A real chunked backfill on a local PostgreSQL (or $$DATABASE_URL) with demo data.
demo: venv
	$(BIN)/dbt-backfill demo

## The demo data on a local PostgreSQL that stays running (state in .demo/postgres), for the local
## cluster: prints WAREHOUSE_URL and AUDIT_URL as export lines (also in .demo/postgres/env).
demo-db: venv
	@$(BIN)/python -m scripts.demo_database up

demo-db-down: venv
	@$(BIN)/python -m scripts.demo_database down

## Everything CI runs: lint, types, the image, and the whole test suite (real PostgreSQL, real dbt,
## a real Kubernetes control plane).
test: venv lint typecheck cluster-bin image
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

e2e: venv cluster-bin
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

## Build the pinned etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl
## (only what is missing from the cache; a cold build takes a while).
cluster-bin:
	localcluster/build.sh

## A local Kubernetes cluster on loopback (state in .cluster/): prints the KUBECONFIG to export.
cluster-up: cluster-bin venv
	$(BIN)/python -m localcluster up --runtime $(RUNTIME)

cluster-down: venv
	$(BIN)/python -m localcluster down

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
	$(BIN)/python -m benchmarks.shop_backfill
	$(BIN)/python -m benchmarks.status_size
	$(BIN)/python -m benchmarks.operator_cluster
	$(BIN)/python -m benchmarks.queue_contention
	$(BIN)/python -m benchmarks.matrix_cluster

clean:
	rm -rf $(VENV) analytics/target analytics/logs analytics/dbt_packages tests/projects/shop/dbt_packages .mypy_cache .ruff_cache .pytest_cache .hypothesis
