# Tether: two commands matter on a fresh machine — `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench fuzz clean venv azurite

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/tether init --if-needed
	$(BIN)/tether run

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run --short

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.run --count $${FUZZ_COUNT:-100000}

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Azurite (Azure Storage API server) for the blob storage tests and `tether dev azurite`, pinned by
# tools/azurite/package-lock.json; the tests run this themselves when node_modules is missing.
azurite:
	cd tools/azurite && npm ci --no-audit --no-fund
