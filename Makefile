PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: serve test lint bench differential conformance clean

# setup.py and the .pyx: the compiled relay checks are rebuilt when they change.
$(STAMP): pyproject.toml setup.py proxy/wire/_cwire.pyx
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

serve: $(STAMP)
	$(BIN)/mongobranch serve

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/mypy proxy
	$(BIN)/pytest -q -ra tests/unit
	$(BIN)/pytest -q -ra --ignore=tests/unit

lint: $(STAMP)
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/mypy proxy

# Seeded random operations on branches vs plain copies, many seeds (tests/differential.py).
SEEDS ?= 5
OPS ?= 2000
MODES ?= wal copy kid
FIRST_SEED ?= 1
differential: $(STAMP)
	$(BIN)/python -m tests.differential --seeds $(SEEDS) --ops $(OPS) --modes "$(MODES)" \
		--first-seed $(FIRST_SEED)

bench: $(STAMP)
	$(BIN)/python benchmarks/passthrough.py

# Opt-in: pymongo's own test modules on the main port and on a branch port.
conformance: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,embedded,conformance]'
	$(BIN)/python -m tests.conformance.run $(ARGS)

clean:
	rm -rf $(VENV) tests/node/node_modules .mongobranch
