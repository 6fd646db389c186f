# Developer entry points. Everything runs from the project virtualenv in .venv.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/.installed
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
PYTEST_ARGS ?=

PROTO := protos/catalog/v1/catalog.proto
# buf (lint and breaking-change checks of the proto) from the npm registry, into .tools/.
BUF_VERSION := 1.75.0
BUF_DIR := .tools/buf-$(BUF_VERSION)
BUF := $(BUF_DIR)/node_modules/.bin/buf
STUBS := catalog_pb2.py catalog_pb2.pyi catalog_pb2_grpc.py catalog_pb2_grpc.pyi
# protoc-gen-mypy and protoc-gen-mypy_grpc must be on PATH.
PROTOC = PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	--python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) $(PROTO)
# Lines that only record the generator's version; other generator versions may differ there.
PROTO_VERSION_LINES := -I 'Protobuf Python Version:' -I '^GRPC_GENERATED_VERSION = ' \
	-I '^    [0-9][0-9]*,$$'

.PHONY: help install proto proto-check proto-lint api-package lint format test run run-cluster bench \
	bench-quick bench-cluster bench-tools lock secrets up down compose-check clean

help:
	@echo "targets: install proto proto-check proto-lint api-package lint format test run run-cluster bench bench-quick bench-cluster bench-tools lock secrets up down compose-check clean"

install: $(STAMP)

# Exactly the versions and hashes of requirements-dev.lock (`make lock`), then the project itself,
# editable, without resolving anything: the same environment on every machine, and no resolver run.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		-e .
	touch $(STAMP)

proto: install
	$(call PROTOC,.)
	touch catalog/__init__.py catalog/v1/__init__.py

proto-check: install
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call PROTOC,$$tmp); \
	stale=0; \
	for f in $(STUBS); do \
		diff -u $(PROTO_VERSION_LINES) "catalog/v1/$$f" "$$tmp/catalog/v1/$$f" || stale=1; \
	done; \
	for f in catalog/__init__.py catalog/v1/__init__.py; do \
		test -e "$$f" || { echo "missing $$f"; stale=1; }; \
	done; \
	if [ "$$stale" != 0 ]; then \
		echo "catalog/v1 is stale against $(PROTO): run 'make proto' and commit the result" >&2; \
		exit 1; \
	fi; \
	echo "catalog/v1 stubs match $(PROTO)"

# `buf lint`, then `buf breaking` against the base: BUF_AGAINST if set (a git ref); on a branch,
# where it forked from main; on main itself its first parent, HEAD~1. CI runs in a fresh clone
# whose main is the commit under test, so there HEAD~1 is main before the submission when it
# landed as a merge, else the previous commit. A base without buf.yaml predates the promise and
# is not compared. Without npm this is skipped with a message, except in CI (CI set).
proto-lint:
	@if [ ! -x $(BUF) ]; then \
		if ! command -v npm >/dev/null; then \
			if [ -n "$${CI:-}" ]; then echo "proto-lint: npm is needed in CI" >&2; exit 1; fi; \
			echo "proto-lint: npm not found: skipping buf lint and buf breaking (CI runs them)"; \
			exit 0; \
		fi; \
		npm install --prefix $(BUF_DIR) --no-save --no-audit --no-fund --loglevel=error \
			@bufbuild/buf@$(BUF_VERSION); \
	fi; \
	$(BUF) lint; echo "buf lint: ok"; \
	if [ -n "$${BUF_AGAINST:-}" ]; then base=$$BUF_AGAINST; \
	elif [ "$$(git rev-parse --abbrev-ref HEAD 2>/dev/null)" != main ] \
			&& git rev-parse -q --verify main^{commit} >/dev/null; then base=$$(git merge-base HEAD main); \
	else base=HEAD~1; fi; \
	if ! git rev-parse -q --verify "$$base^{commit}" >/dev/null 2>&1; then \
		echo "buf breaking: no commit $$base to compare with"; \
	elif ! git cat-file -e "$$base:buf.yaml" 2>/dev/null; then \
		echo "buf breaking: $$(git rev-parse --short "$$base") has no buf.yaml, nothing to compare with"; \
	else \
		tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
		git archive "$$base" buf.yaml protos | tar -x -C "$$tmp"; \
		$(BUF) breaking --against "$$tmp"; \
		echo "buf breaking: nothing breaks callers of $$(git rev-parse --short "$$base")"; \
	fi

# The stubs-only distribution for callers (api/pyproject.toml): dist/catalog_api-*.whl.
api-package: install
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist ./api
	@ls dist/catalog_api-*.whl

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(MAKE) --no-print-directory proto-check
	$(MAKE) --no-print-directory proto-lint

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

run: install
	$(BIN)/python -m devtools.devrun

# The same on a Redis Cluster: CATALOG_REDIS_URL's cluster, else a private 3-primary one.
run-cluster: install
	CATALOG_REDIS_MODE=cluster $(BIN)/python -m devtools.devrun

# Needs the local PostgreSQL (BENCH_DATABASE_URL), redis-server and (for the cluster group, a
# private 3-primary Redis Cluster) redis-cli; see docs/benchmarks.md. Every group, cluster included.
bench: install bench-tools
	$(BIN)/python -m bench

bench-quick: install bench-tools
	$(BIN)/python -m bench --quick --no-write  # a check: only a full run publishes figures

# The cluster group alone (one Redis vs a Redis Cluster, same run); rewrites only its figures.
bench-cluster: install
	$(BIN)/python -m bench --only cluster

# h2load, the C HTTP/2 load generator of the `near` group (bench/h2load.py): Debian's
# nghttp2-client, installed with apt-get when it is missing and we are root; else an error
# saying what to install. Only the benchmarks need it (CI does not run them).
bench-tools:
	@command -v h2load >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "bench-tools: installing nghttp2-client (h2load)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			nghttp2-client </dev/null \
		|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends nghttp2-client </dev/null; }; \
	else \
		echo "bench: h2load is needed: apt-get install nghttp2-client (as root)" >&2; exit 1; \
	fi

# requirements.lock: the runtime dependencies (and the build backend) with their hashes, which
# the Dockerfile installs with --require-hashes; requirements-dev.lock: the same plus the dev
# extra, which `make install` (so CI) installs. Run after changing dependencies in pyproject.toml;
# pins already in the files are kept unless a new requirement excludes them.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --all-build-deps --no-emit-index-url --no-emit-find-links
lock: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'pip-tools>=7.4'
	$(PIP_COMPILE) --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra dev --output-file requirements-dev.lock pyproject.toml

# Random secrets for docker-compose.yml in ./secrets (existing ones are kept).
secrets:
	sh deploy/make-secrets.sh secrets

up: secrets
	$(COMPOSE) up -d --build

down:
	$(COMPOSE) down

compose-check:
	@if command -v docker-compose >/dev/null; then \
		docker-compose config -q && echo "docker-compose.yml is valid"; \
	else \
		echo "docker-compose not installed: skipping compose validation"; \
	fi

clean:
	@# A cluster left running by a killed `make run` would hold files in .run.
	-if [ -x $(BIN)/python ] && [ -d .run/postgres ]; then \
		$(BIN)/python -c 'from pathlib import Path; from devtools.localservers import PostgresCluster as C; C(Path(".run/postgres")).stop()'; \
	fi
	rm -rf $(VENV) .run .tools .import_linter_cache .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info \
		api/build api/*.egg-info \
		.coverage .coverage.* htmlcov
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
