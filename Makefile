# threads-connector: the two commands on the README's first screen are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test unit lint tools tools-kafka tools-registry tools-debian tools-helm tools-image \
        tools-jaeger kafka-jars \
        helm-check bench clean image lock sbom

# The dev environment from the dev lock (exact versions and hashes), then the project itself
# without resolving anything: what the tests run on is what `make lock` wrote down.
$(BIN)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

## demo: local Kafka + Threads API simulator + sample events, end to end, results shown
demo: $(BIN)/.installed
	$(BIN)/connector demo

## tools: what the tests need besides Python: Kafka jars, the schema registry (Apicurio,
## Maven Central), Prometheus (Debian), helm (Go), buildah and debootstrap (Debian), the
## image's Debian base for the image test, and Jaeger (Go) for the tracing test.
## Independent parts: `make -j4 tools` (as .ci/run does) installs them side by side.
tools: tools-kafka tools-registry tools-debian tools-helm tools-image tools-jaeger

tools-kafka: $(BIN)/.installed
	$(BIN)/python -m connector.localkafka fetch

## tools-registry: Apicurio Registry for the format tests, once per machine (5-20 s cold,
## 0.1 s cached in ~/.cache/threads-connector; 3.3.3 on Java >= 21, else 3.0.9). After
## tools-kafka: two Maven runs at once on a cold ~/.m2 would fetch the same plugins at once.
tools-registry: tools-kafka
	bash scripts/fetch-apicurio.sh

tools-debian:
	bash scripts/install-prometheus.sh
	bash scripts/install-buildah.sh

tools-helm: $(BIN)/.installed
	bash scripts/install-helm.sh

## Jaeger built from source once per machine into ~/.cache/threads-connector (~4-7 min cold,
## ~0.01 s warm); nice: it shares the machine with the other tool builds
tools-jaeger:
	nice -n 10 bash scripts/install-jaeger.sh

tools-image: tools-debian
	BASE_ONLY=1 bash scripts/build-image.sh

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

## image: the container image without a Docker engine (buildah; see scripts/build-image.sh)
image:
	bash scripts/build-image.sh

## lock: requirements.lock (the image) and requirements-dev.lock (dev/CI) from pyproject.toml,
## exact versions with hashes for Python 3.11 on every platform; re-run after editing
## pyproject's dependencies (tests/test_lock.py says when the locks are stale)
UV_VERSION := 0.13.8
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --no-emit-find-links \
              --custom-compile-command "make lock" --quiet
## (`make lock UPGRADE=--upgrade` moves every pin to the newest allowed version; without it
## the pins already in the files are kept where pyproject still allows them)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) $(UPGRADE) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --constraint requirements.lock \
	    $(LOCK_FLAGS) $(UPGRADE) -o requirements-dev.lock

## sbom: a CycloneDX SBOM (JSON) of the Python packages in the image's /opt/venv: exactly
## requirements.lock's pins (tests/test_image.py checks the image holds those), with their
## hashes, and the project itself. The Debian packages of the base image are not in it.
CYCLONEDX_VERSION := 7.5.0
sbom: $(BIN)/.installed
	$(BIN)/pip install -q cyclonedx-bom==$(CYCLONEDX_VERSION)
	mkdir -p dist
	$(BIN)/cyclonedx-py requirements requirements.lock --pyproject pyproject.toml \
	    --output-reproducible --output-format JSON --output-file dist/threads-connector.cdx.json
	@echo "wrote dist/threads-connector.cdx.json"

clean:
	rm -rf $(VENV) .local build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
