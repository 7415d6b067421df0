#!/usr/bin/env bash
# Install Debian's buildah and debootstrap, what scripts/build-image.sh and tests/test_image.py
# need to build and run the image without a Docker engine. Idempotent: does nothing when both
# are present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have buildah && have debootstrap; then
  echo "buildah already installed: $(buildah --version)"
  exit 0
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  have sudo || { echo "install-buildah: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends buildah debootstrap
echo "installed: $(buildah --version)"
