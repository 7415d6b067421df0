# threads-connector: the two commands on the README's first screen are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test unit lint tools kafka-jars helm-check bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## demo: local Kafka + Threads API simulator + sample events, end to end, results shown
demo: $(BIN)/.installed
	$(BIN)/connector demo

## tools: what the tests need besides Python: Kafka jars, Prometheus (Debian), helm (Go)
tools: $(BIN)/.installed
	$(BIN)/python -m connector.localkafka fetch
	bash scripts/install-prometheus.sh
	bash scripts/install-helm.sh

## test: lint, then the whole suite (integration tests on a real Kafka broker)
test: tools lint
	$(BIN)/pytest

## unit: the tests that need no broker
unit: $(BIN)/.installed
	$(BIN)/pytest -m "not integration"

lint: $(BIN)/.installed
	$(BIN)/ruff check connector tests bench
	$(BIN)/ruff format --check connector
	$(BIN)/mypy connector

helm-check: tools
	bash scripts/check-helm.sh

## bench: quick versions of the benchmarks (README "Benchmarks" gives the full runs)
bench: $(BIN)/.installed
	$(BIN)/python -m bench.ratelimit_group
	$(BIN)/python -m bench.dedup_memory
	$(BIN)/python -m bench.throughput --events 2000 --rounds 1
	$(BIN)/python -m bench.latency --max-events 5000 --seconds 10
	$(BIN)/python -m bench.inflight --in-flight 1000 --latency-ms 5000 --window-s 5

clean:
	rm -rf $(VENV) .local build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
