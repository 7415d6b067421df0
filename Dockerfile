# syntax=docker/dockerfile:1
#
# threads-connector image: `docker build -t threads-connector:0.1.0 .`
#
# Stage 1 installs the locked dependencies (requirements.lock: exact versions with their
# hashes, `make lock` updates it) into a virtualenv (/opt/venv), then the project's wheel
# without resolving anything (--no-deps), and `pip check` proves the lock satisfies the
# wheel's requirements. Stage 2 is the same slim Python with that virtualenv and nothing else:
# no compiler, no pip cache, no source tree. tests/test_packaging.py repeats these steps
# outside Docker and runs the installed CLI; tests/test_image.py builds the image with buildah
# (scripts/build-image.sh, `make image`) and runs the connector in it.
#
# The base is pinned by version tag. Pin it by digest as well where the registry is reachable
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`, then
# --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...): the digest could not be
# looked up on the machine this file was written on (no registry access there).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies first: this layer is reused until the lock changes.
COPY requirements.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
# Only what the wheel is built from (see .dockerignore).
COPY pyproject.toml README.md ./
COPY connector ./connector
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/threads_connector-*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/connector --help > /dev/null

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="threads-connector" \
      org.opencontainers.image.description="Kafka domain events to Mindset Threads API conversations" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric UID/GID so Kubernetes can verify runAsNonRoot; matches the chart's securityContext.
RUN groupadd --system --gid 10001 connector \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin connector
COPY --from=build /opt/venv /opt/venv
# A default config (the repository's example); Kubernetes mounts its ConfigMap over the folder.
COPY config/connector.yaml /etc/threads-connector/connector.yaml
# Read-only root filesystem friendly: no bytecode writes, logs to stdout, only /tmp writable
# (the chart mounts an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 9464
# SIGTERM starts the drain (bounded by delivery.drain_timeout_s); a second signal exits at once.
STOPSIGNAL SIGTERM
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on port 9464.
# `connector` accepts any verb: `docker run IMAGE check-config --online --config ...`
ENTRYPOINT ["connector"]
CMD ["run", "--config", "/etc/threads-connector/connector.yaml"]
