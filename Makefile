# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck pytest clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fleettrack needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[test]' --config-settings editable_mode=compat
	touch $@

serve: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= fleettrack

lint: $(STAMP)
	$(BIN)/ruff check fleettrack tests twisted benchmarks
	$(BIN)/ruff format --check fleettrack tests twisted benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
