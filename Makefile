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

.PHONY: help run test test-only system lint format bench schema check clean venv

help:
	@echo "make run     set up .venv and run the gateway on $(CONFIG) with the demo backend"
	@echo "make test    install what the suite needs (system servers, .venv), run ruff, mypy and the"
	@echo "             whole test suite"
	@echo "make system  only install the system servers the suite needs (scripts/setup_system.sh)"
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

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[test]'
	@touch $@

$(STAMP_LOADTEST): pyproject.toml | $(BIN)/python
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

test-only: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q --durations=10

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
