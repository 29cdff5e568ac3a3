# Make targets: the README's two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VAR := var

.PHONY: deps venv stores demo run stop status ctl init doctor test chaos soak bench bench-pipeline lint clean

# Debian packages the pipeline needs that a fresh machine may lack.
deps:
	@missing=""; \
	command -v influxd >/dev/null || missing="$$missing influxdb"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v pg_ctlcluster >/dev/null || missing="$$missing postgresql"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/mdp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/mdp

# Start the stores if they are not running: the bus Redis (AOF) and InfluxDB run privately with their data
# under var/redis and var/influxdb; PostgreSQL is the machine's service.
stores: deps
	@bash tools/start-stores.sh

# CONFIG picks another config file (e.g. make demo CONFIG=/tmp/other-ports.toml).
demo: venv stores
	@bash tools/supervise.sh start $(or $(CONFIG),config/simulator.toml)

run: venv stores
	@bash tools/supervise.sh start $(or $(CONFIG),config/live.toml)

stop:
	-@bash tools/supervise.sh stop  # its error is printed; the stores below are stopped all the same
	@if [ -f $(VAR)/influxdb/influxd.pid ] && kill $$(cat $(VAR)/influxdb/influxd.pid) 2>/dev/null; then \
	  echo "stopped the private InfluxDB"; rm -f $(VAR)/influxdb/influxd.pid; fi
	@for pidfile in $(VAR)/redis/redis-*.pid; do \
	  [ -f "$$pidfile" ] && kill $$(cat "$$pidfile") 2>/dev/null && \
	  echo "stopped the bus Redis ($$pidfile; its AOF in $(VAR)/redis keeps the streams for the next start)"; \
	done; true

status: venv
	@$(BIN)/mdp status

# Build every storage tier (InfluxDB retention policies / buckets / databases) and apply PostgreSQL migrations.
init: venv stores
	$(BIN)/mdp init

# Check a deployment (stores, bus persistence, tiers, migrations, exchanges, programs) and say what to fix.
doctor: venv
	$(BIN)/mdp doctor

# supervisorctl with the project's config: make ctl ARGS="restart validator:*"
ctl:
	@bash tools/supervise.sh ctl $(or $(ARGS),status)

test: deps venv lint
	@bash tools/start-stores.sh --no-influx
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The chaos suite (docs/chaos.md): the pipeline on private stores under seeded faults, checked against ground
# truth from the raw captures. `CHAOS_SEEDS=1,2,3 make chaos` (default one random seed, printed; reports in
# var/chaos/). `make soak`: 30 minutes (SOAK_S), faults every few seconds, report in docs/soak-report.md.
chaos: deps venv
	@bash tools/start-stores.sh --no-influx
	$(BIN)/python -m tools.chaos.run

soak: deps venv
	@bash tools/start-stores.sh --no-influx
	$(BIN)/python -m tools.chaos.run --soak $(or $(SOAK_S),1800) --soak-report docs/soak-report.md

bench: deps venv
	@bash tools/start-stores.sh --no-influx
	$(BIN)/python -m tools.bench
	$(BIN)/python -m tools.bench_quality
	$(BIN)/python -m tools.bench_quality_live
	$(BIN)/python -m tools.bench_backfill
	$(BIN)/python -m tools.bench_postgres
	$(BIN)/python -m tools.bench_storage
	$(BIN)/python -m tools.bench_query
	$(BIN)/python -m tools.bench_gap_repair
	$(BIN)/python -m tools.bench_collector
	$(BIN)/python -m tools.bench_faults

# The whole pipeline under supervisord, offered load stepped up until it no longer keeps up (docs/scaling.md;
# about 2 minutes a rung). BENCH_PIPELINE_ARGS, e.g. "--rates 5000,10000 --symbols 50".
bench-pipeline: deps venv
	@bash tools/start-stores.sh --no-influx
	$(BIN)/python -m tools.bench_pipeline $(BENCH_PIPELINE_ARGS)

# ruff; mypy as configured in pyproject.toml ([tool.mypy]: strict on common/ and schemas/); and the import
# direction (import-linter contracts in pyproject.toml [tool.importlinter], docs/architecture.md).
lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy
	$(BIN)/lint-imports --no-cache

clean: stop
	rm -rf $(VAR) $(VENV)
