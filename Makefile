# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck pytest clean bench demo

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

# The project's own benchmark (ingest, fanout, gateway, idle; about a minute).
# e.g.  make bench BENCH_ARGS="--workload ingest --seconds 30"
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The daemon on port 3001 with 50 simulated vehicles and 2 viewers; Ctrl-C stops both.
demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
