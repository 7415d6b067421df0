#!/usr/bin/env bash
# Install Debian's `prometheus` package (the server and promtool) for the observability
# tests (tests/test_observability.py), which start their own Prometheus on a free port.
# Idempotent: does nothing when both binaries are present.
#
#   scripts/install-prometheus.sh
#
# The package's maintainer scripts would start a system-wide prometheus service on :9090;
# the tests never use it, so the install runs with a policy-rc.d that forbids starting
# services, and any service the package did manage to start is stopped and disabled.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have prometheus && have promtool; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  have sudo || { echo "install-prometheus: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=""
if [[ ! -e "$POLICY" ]]; then
  # invoke-rc.d asks policy-rc.d before starting a service: 101 = "action forbidden".
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  created_policy=1
fi
cleanup() { if [[ -n "$created_policy" ]]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends prometheus

# Belt and braces: no system prometheus left running (it would hold port 9090), nor
# enabled to start at the next boot.
if have deb-systemd-helper; then
  # (it refuses to run outside a maintainer script unless told which package it serves)
  $SUDO env DPKG_MAINTSCRIPT_PACKAGE=prometheus \
    deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
fi
if have systemctl && [[ -d /run/systemd/system ]]; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif have service; then
  $SUDO service prometheus stop >/dev/null 2>&1 || true
fi
if [[ -f /run/prometheus.pid ]]; then
  # only the daemon the package's init script started (its pid file), never by name
  pid="$(cat /run/prometheus.pid)"
  if [[ -n "$pid" ]] && $SUDO kill "$pid" 2>/dev/null; then
    echo "stopped the packaged prometheus service (pid $pid)"
  fi
fi

have prometheus && have promtool || {
  echo "install-prometheus: prometheus/promtool still missing after the install" >&2
  exit 1
}
echo "installed: $(prometheus --version 2>&1 | head -n1)"
echo "           $(promtool --version 2>&1 | head -n1)"
