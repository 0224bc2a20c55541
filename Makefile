# Two entry points: `make run` (the backend on :9090) and `make test` (the whole suite).
# Both create .venv on first use and reinstall only when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/grounded-sam-backend serve

lint: $(STAMP)
	$(VENV)/bin/ruff check backend tests bench

test: lint
	$(VENV)/bin/pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run_all
