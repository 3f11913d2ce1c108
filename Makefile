# Two commands matter: `make run` (set up and run the gateway on config/gateway.yaml with the
# bundled demo backend) and `make test` (set up and run lint + the whole test suite).
# Both create ./.venv on first use; it is re-installed only when pyproject.toml changes.
# `make test` also installs the system servers the suite starts (scripts/setup_system.sh: apt,
# with sudo when not root; a quick no-op when everything is there).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/gateway.yaml
PIP    := $(BIN)/python -m pip --disable-pip-version-check

STAMP          := $(VENV)/.installed-test
STAMP_LOADTEST := $(VENV)/.installed-loadtest

.PHONY: help run test test-only system lint format bench schema check clean venv compile

help:
	@echo "make run     set up .venv and run the gateway on $(CONFIG) with the demo backend"
	@echo "make test    install what the suite needs (system servers, .venv), run ruff, mypy and the"
	@echo "             whole test suite"
	@echo "make system  only install the system servers the suite needs (scripts/setup_system.sh)"
	@echo "make compile build the compiled hot path (mypyc, into build/compiled; gateway version"
	@echo "             shows what runs, GATEWAY_PURE_PYTHON=1 forces the sources)"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make format  ruff format + ruff check --fix"
	@echo "make check   validate $(CONFIG) (gateway check)"
	@echo "make bench   run the load-test harness (python -m loadtest)"
	@echo "make schema  regenerate config/schema.json"
	@echo "make clean   remove .venv, caches and build output"

# The interpreter is the marker of a usable venv. Debian's python3 needs the python3-venv
# package for `-m venv` (ensurepip): setup_system.sh --venv installs it when it is missing. A
# failed attempt leaves a broken directory, so remove it.
$(BIN)/python:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_system.sh --venv
	@$(PYTHON) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  echo ""; \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu install the venv module with:"; \
	  echo "    sudo apt-get update && sudo apt-get install -y python3-venv"; \
	  echo "then run make again."; \
	  exit 1; }

# Editable: setup.py compiles nothing for it (the live sources run); `make compile` builds the
# hot path into build/compiled. A plain `pip install .` builds it into the package instead.
$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q -e '.[test]'
	@touch $@

$(STAMP_LOADTEST): pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q -e '.[test,loadtest]'
	@touch $@ $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway run -c $(CONFIG) --with-demo

check: $(STAMP)
	$(BIN)/gateway check -c $(CONFIG)

# The system servers first (that may install python3-venv too), then the venv and the suite:
# a recursive make keeps that order even under -j.
test: system
	@$(MAKE) --no-print-directory test-only

# The suite runs compiled, and tests/unit/test_compiled.py must then find the build (it fails
# instead of skipping with GATEWAY_REQUIRE_COMPILED=1); a fast pure-mode pass follows.
test-only: $(STAMP) compile
	$(BIN)/ruff check .
	$(BIN)/mypy
	GATEWAY_REQUIRE_COMPILED=1 $(BIN)/pytest -q --durations=10
	# Pure mode: the same tables on the sources; the compiled-vs-pure comparisons ran above
	# (they cannot run here, where the compiled modules are switched off), so they are left out.
	GATEWAY_PURE_PYTHON=1 $(BIN)/pytest -q tests/unit/test_headers.py tests/unit/test_normalize.py \
	  tests/unit/test_upstream_framing.py tests/unit/test_request_body.py tests/unit/test_metrics.py \
	  tests/unit/test_routing.py tests/unit/test_balancers.py tests/unit/test_balancers_hash.py \
	  tests/unit/test_ratelimit_limiter.py tests/unit/test_compiled.py tests/unit/test_dataplane_lifetime.py \
	  -k "not _compiled_"

# mypyc compiles gateway.compiled.COMPILED_MODULES (seconds); needs gcc and the Python headers
# (make system installs them on Debian).
compile: $(STAMP)
	$(BIN)/python -c 'import sys; from gateway.compiled import main; sys.exit(main(["build"]))'

system:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_system.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP_LOADTEST)
	$(BIN)/python -m loadtest $(BENCH_ARGS)

schema: $(STAMP)
	$(BIN)/python -m gateway.config.jsonschema_gen > config/schema.json.tmp
	mv config/schema.json.tmp config/schema.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
