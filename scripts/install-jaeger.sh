#!/usr/bin/env bash
# Build the pinned Jaeger (v2 engine: `cmd/jaeger`, OTLP in, query API out) from source with
# the machine's Go toolchain into the user's cache, once per machine and version. The tracing
# integration test (tests/test_tracing_integration.py) runs this binary on loopback ports.
#
# Idempotent: when the cached binary is there it prints its path and does nothing (~0.01 s).
# A cold build takes about 7 minutes on 2 cores (module download ~2 min + compile ~4-5 min)
# and leaves ~3 GB in the Go caches; run it with `nice` on a shared machine.
#
#   scripts/install-jaeger.sh                 # -> ~/.cache/threads-connector/jaeger-v1.75.0/jaeger
#   JAEGER_VERSION=v1.x.y scripts/install-jaeger.sh
set -euo pipefail

JAEGER_VERSION="${JAEGER_VERSION:-v1.75.0}"
CACHE="${THREADS_CONNECTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/threads-connector}"
DIR="$CACHE/jaeger-$JAEGER_VERSION"
BIN="$DIR/jaeger"

if [[ -x "$BIN" ]]; then
  echo "jaeger $JAEGER_VERSION already built at $BIN"
  exit 0
fi
command -v go >/dev/null || { echo "install-jaeger: the Go toolchain (go) is required" >&2; exit 1; }
echo "building jaeger $JAEGER_VERSION with $(go version) (about 7 minutes cold) ..."
start=$(date +%s)
# A throw-away module that requires Jaeger as a tool: `go install pkg@version` refuses modules
# whose go.mod has replace directives, a tool module does not care.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$DIR"
(
  cd "$work"
  export GOTOOLCHAIN=local CGO_ENABLED=0
  go mod init local/jaegertool >/dev/null 2>&1
  go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@${JAEGER_VERSION}"
  go build -trimpath -ldflags "-s -w" -o "$BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
)
mv "$BIN.tmp" "$BIN"
echo "jaeger built in $(( $(date +%s) - start ))s at $BIN"
