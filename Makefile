# runservice developer and CI entry points. Every target installs what it needs:
# `make run` needs only python3 (3.11+) and make; `make test` also node 20 + npm, Go 1.26+
# and PostgreSQL's server binaries (.ci/run installs them with apt).
#
#   make venv         create .venv and install the package with its dev extras
#   make proto        regenerate runservice/v1 from protos/
#   make proto-check  fail if the committed generated code is stale
#   make buf          install the pinned buf CLI into protos/node_modules
#   make lint         buf lint, ruff check, ruff format --check, mypy --strict (runservice, bench)
#   make test         lint, proto-check, then pytest (extra args: PYTEST_ARGS=...), then test-postgres
#   make test-postgres  the API acceptance suite with each server on a private PostgreSQL
#   make test-go      go vet and go test of the Go client in clients/go (needs go 1.26+)
#   make test-typescript  npm ci, build and test the TypeScript client in clients/typescript
#   make test-browser  the web example (examples/web) in headless Chromium (WEB_SCREENSHOT=PATH: its picture)
#   make conformance  the Durable Streams conformance suite against runservice's /v1/streams
#   make faults       the fault matrix against real server processes (docs/reliability/faults.md)
#   make soak         mixed load for DURATION (default 30m), sampled and plotted (docs/reliability/soak.md)
#   make run          start a development server (installs the package without its dev extras)
#   make cluster      three replicas on a private PostgreSQL (.cluster/); Ctrl-C stops them
#   make clean        remove caches and build output (distclean: also .venv, node_modules)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Two stamps: the package with its dev extras (tests, linters, generators) for every
# target but run, and the package alone (what serving needs) for run. The dev install
# includes the serving one, so it stamps both.
VENV_STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

PROTO_DIR := protos
BUF_STAMP := $(PROTO_DIR)/node_modules/.installed
BUF := $(PROTO_DIR)/node_modules/.bin/buf

# Our own protos. protos/google/rpc is vendored and never generated: Python
# imports google.rpc from the googleapis-common-protos wheel.
PROTO_FILES := $(sort $(wildcard $(PROTO_DIR)/runservice/v1/*.proto))

# Python generation. Output lands in $(PY_OUT)/runservice/v1/.
PY_GEN_DIR := runservice/v1
PROTOC_PY = $(VENV_PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
	--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) $(PROTO_FILES)

# ---------------------------------------------------------------------------
# Other languages: add Go / TypeScript generation HERE.
# Append the language to PROTO_LANGS and define proto-<lang> (regenerate into
# the committed tree) and proto-check-<lang> (regenerate into a temp dir and
# diff byte for byte). Pin every generator exactly; e.g. for Go:
#   PROTOC_GEN_GO_VERSION      := vX.Y.Z
#   PROTOC_GEN_GO_GRPC_VERSION := vX.Y.Z
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
#   $(VENV_PY) -m grpc_tools.protoc -I $(PROTO_DIR) --plugin=protoc-gen-go=... --go_out=...
# ---------------------------------------------------------------------------
PROTO_LANGS := python go typescript

# Go generation into clients/go/runservice/v1 (package runservicev1). The
# plugins are pinned here and installed into clients/go/.bin, so nothing
# depends on the machine's GOPATH; google.rpc.Status comes from
# google.golang.org/genproto/googleapis/rpc via status.proto's go_package.
GO_DIR := clients/go
GO_MODULE := github.com/runservice/runservice/clients/go
GO_GEN_DIR := $(GO_DIR)/runservice/v1
GO_BIN := $(abspath $(GO_DIR)/.bin)
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GO_PLUGINS_STAMP := $(GO_BIN)/.installed-$(PROTOC_GEN_GO_VERSION)-$(PROTOC_GEN_GO_GRPC_VERSION)
PROTOC_GO = $(VENV_PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
	--plugin=protoc-gen-go=$(GO_BIN)/protoc-gen-go \
	--plugin=protoc-gen-go-grpc=$(GO_BIN)/protoc-gen-go-grpc \
	--go_out=$(1) --go_opt=module=$(GO_MODULE) \
	--go-grpc_out=$(1) --go-grpc_opt=module=$(GO_MODULE) $(PROTO_FILES)

# TypeScript generation into clients/typescript/src/gen with ts-proto (pinned exactly
# in clients/typescript/package.json, locked in its package-lock.json). It also emits
# the google/protobuf and google/rpc types the client needs (ErrorInfo for errors).
TS_DIR := clients/typescript
TS_GEN_DIR := $(TS_DIR)/src/gen
TS_STAMP := $(TS_DIR)/node_modules/.installed
TS_PROTO_OPTS := outputServices=grpc-js,esModuleInterop=true,forceLong=bigint,env=node
TS_PROTO_FILES := $(PROTO_FILES) $(PROTO_DIR)/google/rpc/status.proto $(PROTO_DIR)/google/rpc/error_details.proto
PROTOC_TS = $(VENV_PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
	--plugin=protoc-gen-ts_proto=$(TS_DIR)/node_modules/.bin/protoc-gen-ts_proto \
	--ts_proto_out=$(1) --ts_proto_opt=$(TS_PROTO_OPTS) $(TS_PROTO_FILES)

# grpcurl, pinned, installed project-locally: the tests run every README recipe with it.
GRPCURL_VERSION := v1.9.4
GRPCURL := .tools/bin/grpcurl
# ghz, the gRPC load tester, pinned and beside grpcurl: tests/test_reflection.py drives it
# through reflection alone.
GHZ_VERSION := v0.121.0
GHZ := .tools/bin/ghz
# promtool, from Debian's prometheus package (the daemon itself is never installed):
# tests/test_metrics.py runs `promtool check metrics` on a scrape.
PROMTOOL := .tools/bin/promtool

PYTEST_ARGS ?=
# Set to 1 to accept pytest's exit code 5 ("no tests collected") as success.
ALLOW_NO_TESTS ?=

.PHONY: help venv proto proto-check buf lint test run clean distclean \
	$(addprefix proto-,$(PROTO_LANGS)) $(addprefix proto-check-,$(PROTO_LANGS))

help:
	@sed -n "s/^#   make /make /p" $(firstword $(MAKEFILE_LIST))

# --- Python environment -----------------------------------------------------

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -e '.[dev]'
	touch $(RUN_STAMP) $@

# Serving only: no dev extras. A venv whose dev install is current (an older Makefile
# made no run stamp) already has all of it.
$(RUN_STAMP): pyproject.toml
	if [ ! $(VENV_STAMP) -nt pyproject.toml ]; then \
		test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV); \
		$(VENV_PY) -m pip install --quiet --upgrade pip; \
		$(VENV_PY) -m pip install --quiet -e .; \
	fi
	touch $@

# --- buf (pinned in protos/package.json, locked in protos/package-lock.json) --

buf: $(BUF_STAMP)

$(BUF_STAMP): $(PROTO_DIR)/package.json $(PROTO_DIR)/package-lock.json
	npm ci --prefix $(PROTO_DIR) --no-audit --no-fund
	test -x $(BUF)
	touch $@

# --- Code generation --------------------------------------------------------

proto: $(addprefix proto-,$(PROTO_LANGS))

proto-check: $(addprefix proto-check-,$(PROTO_LANGS))

proto-python: $(VENV_STAMP)
	rm -f $(PY_GEN_DIR)/*_pb2.py $(PY_GEN_DIR)/*_pb2.pyi $(PY_GEN_DIR)/*_pb2_grpc.py
	$(call PROTOC_PY,.)

proto-check-python: $(VENV_STAMP)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call PROTOC_PY,$$tmp); \
	if ! diff -r --exclude=__pycache__ --exclude=__init__.py \
		"$$tmp/$(PY_GEN_DIR)" $(PY_GEN_DIR); then \
		echo "generated code is stale: run make proto" >&2; \
		exit 1; \
	fi; \
	echo "generated Python code is up to date"

$(GO_PLUGINS_STAMP):
	rm -f $(GO_BIN)/.installed-*
	GOBIN=$(GO_BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(GO_BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	touch $@

proto-go: $(VENV_STAMP) $(GO_PLUGINS_STAMP)
	rm -f $(GO_GEN_DIR)/*.pb.go
	$(call PROTOC_GO,$(GO_DIR))

proto-check-go: $(VENV_STAMP) $(GO_PLUGINS_STAMP)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call PROTOC_GO,$$tmp); \
	if ! diff -r "$$tmp/runservice/v1" $(GO_GEN_DIR); then \
		echo "generated Go code is stale: run make proto" >&2; \
		exit 1; \
	fi; \
	echo "generated Go code is up to date"

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && npm ci --no-audit --no-fund
	touch $@

proto-typescript: $(VENV_STAMP) $(TS_STAMP)
	rm -rf $(TS_GEN_DIR)
	mkdir -p $(TS_GEN_DIR)
	$(call PROTOC_TS,$(TS_GEN_DIR))

proto-check-typescript: $(VENV_STAMP) $(TS_STAMP)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call PROTOC_TS,$$tmp); \
	if ! diff -r "$$tmp" $(TS_GEN_DIR); then \
		echo "generated TypeScript code is stale: run make proto" >&2; \
		exit 1; \
	fi; \
	echo "generated TypeScript code is up to date"

# --- Checks -----------------------------------------------------------------

lint: $(VENV_STAMP) $(BUF_STAMP)
	cd $(PROTO_DIR) && ./node_modules/.bin/buf lint
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .
	$(VENV_PY) -m mypy --strict runservice bench tools
	$(VENV_PY) -m mypy --strict --follow-imports=silent faults

test: $(VENV_STAMP) $(BUF_STAMP) $(GRPCURL) $(GHZ) $(PROMTOOL)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory proto-check
	$(MAKE) --no-print-directory test-go
	$(MAKE) --no-print-directory test-typescript
	rc=0; $(VENV_PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ] && [ -n "$(ALLOW_NO_TESTS)" ]; then \
		echo "pytest collected no tests (exit 5): accepted because ALLOW_NO_TESTS is set"; \
		rc=0; \
	fi; \
	exit "$$rc"
	$(MAKE) --no-print-directory test-postgres

# The acceptance suite of the API again, each server on a private PostgreSQL database
# (one replica); tests/test_replicas.py runs two and three in the main suite.
ACCEPTANCE := tests/test_api_runs.py tests/test_api_policies.py tests/test_api_access.py \
	tests/test_external_runs.py tests/test_web_streams.py
# The Durable Streams server conformance suite (pinned in conformance/) against a live
# runservice's /v1/streams: at least as many of its tests must pass as the Node reference
# server passes (324; runservice passes 332, failing none).
CONFORMANCE_MIN_PASS ?= 324
.PHONY: conformance
conformance: $(VENV_STAMP)
	CONFORMANCE_MIN_PASS=$(CONFORMANCE_MIN_PASS) conformance/run-runservice.sh \
		$(CURDIR)/conformance/reports/runservice.json

.PHONY: test-postgres
test-postgres: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q --store postgresql $(ACCEPTANCE)

.PHONY: test-go
test-go:
	cd $(GO_DIR) && go vet ./... && go test ./...

.PHONY: test-typescript
test-typescript:
	cd $(TS_DIR) && npm ci --no-audit --no-fund && npm run build && npm test

# The web example (examples/web) driven by headless Chromium: Debian's `chromium` package
# (.ci/run installs it with apt), through Playwright (the `browser` extra, installed here;
# it never downloads a browser of its own). WEB_SCREENSHOT=docs/images/web-example.png also
# writes the picture docs/http.md shows. About 40 seconds on 2 cores.
BROWSER_STAMP := $(VENV)/.installed-browser
WEB_SCREENSHOT ?=

$(BROWSER_STAMP): $(VENV_STAMP) pyproject.toml
	$(VENV_PY) -m pip install --quiet -e '.[dev,browser]'
	touch $@

.PHONY: test-browser
test-browser: $(BROWSER_STAMP)
	@command -v chromium >/dev/null || { echo "chromium is missing: apt-get install chromium" >&2; exit 1; }
	WEB_EXAMPLE_BROWSER=required WEB_EXAMPLE_SCREENSHOT=$(WEB_SCREENSHOT) \
		$(VENV_PY) -m pytest -q tests/test_web_example_browser.py

# --- Running ----------------------------------------------------------------

run: $(RUN_STAMP)
	$(VENV)/bin/runservice serve --dev-token

# Three replicas on 127.0.0.1:50061-50063 sharing a private PostgreSQL (127.0.0.1:50060) and
# a tokens file, all kept in .cluster/; CLUSTER_PORTS, CLUSTER_PG_PORT, CLUSTER_DIR move them.
.PHONY: cluster
cluster: $(VENV_STAMP)
	$(VENV_PY) -m tools.cluster

.PHONY: grpcurl
grpcurl: $(GRPCURL)

$(GRPCURL):
	GOBIN=$(CURDIR)/.tools/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

.PHONY: ghz
ghz: $(GHZ)

$(GHZ):
	GOBIN=$(CURDIR)/.tools/bin go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

.PHONY: promtool
promtool: $(PROMTOOL)

# apt-get download fetches the .deb without installing it; the package lists are read
# first if it finds none. dpkg -x unpacks it aside, and promtool alone is kept.
$(PROMTOOL):
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; chmod 755 "$$tmp"; \
	cd "$$tmp" && { apt-get download prometheus || { apt-get update && apt-get download prometheus; }; }; \
	dpkg -x "$$tmp"/prometheus_*.deb "$$tmp/root"; \
	mkdir -p $(CURDIR)/$(dir $@); \
	install -m 755 "$$tmp/root/usr/bin/promtool" $(CURDIR)/$@
	$@ --version

# --- Benchmarks -------------------------------------------------------------

# runservice (real server, SQLite, temp dir) beside a bare grpc.aio server streaming the
# same messages: prints the table and writes docs/performance/ (results.md, results.json,
# PNG charts). About 15 minutes on 2 cores. Extra flags: BENCH_ARGS="--scenarios replay".
BENCH_ARGS ?=

.PHONY: bench
bench: $(VENV_STAMP)
	$(VENV_PY) -m bench --out docs/performance $(BENCH_ARGS)

# --- Reliability ------------------------------------------------------------

# The fault matrix (faults/): SIGKILL, SIGTERM, a held write lock, a full disk, bad files,
# stuck and slow subscribers, a reconnect storm and lifecycle races, each against real
# server processes and ended by one checker; and webhooks through a 20 s receiver outage
# and a restart (faults/test_webhooks.py, about 80 s of it). Writes
# docs/reliability/faults.{json,md} (a -k run updates its rows only). About 4 minutes on
# 2 cores.
# One row: make faults FAULTS_ARGS="-k sigkill_during_drain".
FAULTS_ARGS ?=
FAULTS_TIMEOUT ?= 300

.PHONY: faults
faults: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q faults -p no:cacheprovider --timeout $(FAULTS_TIMEOUT) $(FAULTS_ARGS)

# Mixed load for DURATION (30m, 2m, 1h...), sampling RSS, open files, loop lag and commit
# latency; writes docs/reliability/soak.md and its PNG plots, with each metric's slope.
DURATION ?= 30m

.PHONY: soak
soak: $(VENV_STAMP)
	$(VENV_PY) -m faults.soak --duration $(DURATION) --out docs/reliability

# --- Cleaning ---------------------------------------------------------------

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -path ./$(PROTO_DIR)/node_modules -prune -o \
		-type d -name __pycache__ -exec rm -rf {} +
	rm -rf $(TS_DIR)/dist

distclean: clean
	rm -rf $(VENV) $(PROTO_DIR)/node_modules
	rm -rf $(TS_DIR)/node_modules
