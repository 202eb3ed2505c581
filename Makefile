# SecAPI developer commands. `make dev` runs the embedded stack, `make test` the whole suite.
# Everything installs itself: Debian packages (as root), the virtual environment in .venv/,
# and the test bed's Go binaries, cached in $(SECAPI_CACHE) outside the repository.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SECAPI_CACHE ?= $(HOME)/.cache/secapi
export SECAPI_CACHE
# The stamp changes whenever the dependency list does, so the venv is rebuilt only then.
VENV_STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha256sum | cut -c1-12)

HOST ?= 127.0.0.1
PORT ?= 8000
ADVISORIES ?= tests/testbed/advisories
OUT ?= .testbed/trivy-cache

.PHONY: help venv dev test lint unit testbed testbed-down trivy-db bench e2e-kind clean

help:
	@echo "make dev           run the embedded stack (API, local executor, SQLite) on http://$(HOST):$(PORT)"
	@echo "make test          set up everything (packages, test bed) and run the whole suite"
	@echo "make testbed       start the test bed on loopback and write .testbed/env"
	@echo "make testbed-down  stop the test bed and remove its data"
	@echo "make trivy-db ADVISORIES=DIR OUT=DIR   build a Trivy cache folder from advisory YAML"
	@echo "make bench         run the benchmarks, write bench/results/latest.json"
	@echo "make e2e-kind      run the end-to-end suite against a kind cluster (needs Docker)"

$(VENV_STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(VENV_STAMP)

TRIVY_VERSION := v0.74.0
TRIVY_CACHED := $(SECAPI_CACHE)/bin/trivy-$(TRIVY_VERSION)/trivy

# Trivy comes from SECAPI_SCANNER__TRIVY_BIN, then PATH, then the cache; when none has it,
# it is built from its Go module (several minutes, once).
dev: venv
	@trivy_bin="$${SECAPI_SCANNER__TRIVY_BIN:-$$(command -v trivy || true)}"; \
	if [ -z "$$trivy_bin" ]; then \
		[ -x "$(TRIVY_CACHED)" ] || $(PYTHON) tests/testbed/build_tools.py trivy || exit 1; \
		trivy_bin="$(TRIVY_CACHED)"; \
	fi; \
	echo "SecAPI on http://$(HOST):$(PORT) (docs at /docs), Trivy: $$trivy_bin"; \
	SECAPI_SCANNER__TRIVY_BIN="$$trivy_bin" exec $(BIN)/secapi serve --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	@# mypy cannot follow setup.py's folder mapping, so it checks a tree of symlinks that
	@# has the installed layout (secapi/core, secapi/api, secapi/operator).
	@rm -rf $(VENV)/typecheck && mkdir -p $(VENV)/typecheck/secapi
	@for f in secapi/*.py; do ln -s "$(CURDIR)/$$f" $(VENV)/typecheck/secapi/; done
	@for d in core api operator; do ln -s "$(CURDIR)/$$d" $(VENV)/typecheck/secapi/$$d; done
	cd $(VENV)/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p secapi.core

testbed: venv
	$(BIN)/python -m tests.testbed up

testbed-down: venv
	$(BIN)/python -m tests.testbed down

trivy-db: venv
	$(BIN)/python -m tests.testbed.trivy_db $(ADVISORIES) $(OUT)

test: venv lint
	$(BIN)/python -m tests.testbed up
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m tests.testbed up
	$(BIN)/python -m bench

e2e-kind:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { \
		echo "make e2e-kind needs a running Docker engine and kind; this machine has none." >&2; exit 2; }
	bash tests/kind/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
