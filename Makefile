# m2fp-serve: the two commands of the README, and a few helpers.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test test-fast lint format install bench clean

## make run: install what is missing, then run Redis, worker(s), gateway and Flower in the foreground
run: install
	$(PY) scripts/stack.py

## make test: install what is missing, then the lint gate, then the whole test suite
test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

## make lint: ruff (lint + format check), mypy, the function-length gate; a new warning fails
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) scripts/check_lengths.py

## make format: apply ruff's formatter and its safe fixes
format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## make test-fast: unit tests only (no services, no full-size model)
test-fast: install
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

install:
	./scripts/bootstrap.sh

bench: install
	$(PY) bench/model_bench.py

clean:
	rm -rf .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
