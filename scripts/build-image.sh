#!/usr/bin/env bash
# Build the container image without a Docker engine: buildah with chroot isolation.
#
#   scripts/build-image.sh            (or `make image`)
#
# Where a Docker engine runs, `docker build .` is all it takes (the Dockerfile's default base
# is the official python:3.11-slim image). This script is for machines without one, and for
# CI, where no container registry is reachable either:
#   1. installs buildah and debootstrap with apt-get when they are missing;
#   2. makes the base image from Debian packages (debootstrap --variant=minbase: Python 3.11,
#      venv, pip, CA certificates), committed as $BASE_IMAGE; skipped when that image exists
#      (to take Debian's latest updates, `buildah --storage-driver vfs rmi` it first);
#   3. builds the Dockerfile on it (--build-arg PYTHON_IMAGE=$BASE_IMAGE) as $IMAGE.
# The host's CA bundle is mounted read-only for the build only (the machine may reach PyPI
# through a TLS proxy whose CA is in that bundle); it is never copied into the image.
#
# Settings (environment): BASE_ONLY=1 (steps 1 and 2 only), IMAGE (localhost/threads-connector:dev), BASE_IMAGE
# (localhost/debian-python:3.11-bookworm-<recipe hash>), DEBIAN_MIRROR (the first Debian
# mirror apt uses), CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt), STORAGE_DRIVER (vfs:
# works on any kernel and file system, and is what tests/test_image.py reads the image with).
# Prints how long each step took on stderr ("build-image: <step> <seconds> s").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/threads-connector:dev}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
# The base's tag names its recipe: a change to the suite or the packages makes a new base.
RECIPE="$(printf '%s' "minbase $SUITE $PACKAGES" | sha256sum | cut -c1-8)"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-python:3.11-$SUITE-$RECIPE}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)"

have() { command -v "$1" >/dev/null 2>&1; }
say() { echo "build-image: $*" >&2; }
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  have sudo || { say "run as root or install sudo (buildah and debootstrap need root here)"; exit 1; }
  SUDO="sudo"
fi
bah() { $SUDO buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

# -- 1. tools ---------------------------------------------------------------------------------
started=$SECONDS
if ! have buildah || ! have debootstrap; then
  bash "$ROOT/scripts/install-buildah.sh" >&2
  say "tools $((SECONDS - started)) s"
fi

# -- 2. the base image, from Debian packages ----------------------------------------------------
debian_mirror() {
  # The first Debian archive apt is configured with (deb822 .sources or one-line .list).
  local uri
  uri="$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
           /etc/apt/sources.list.d/*.list 2>/dev/null \
         | grep -o -E 'https?://[^ ]+/debian/?( |$)' | grep -v -- '-security' | head -n1 || true)"
  echo "${uri%% *}" | sed 's:/*$::'
}

if [[ -n "$(bah images --quiet "$BASE_IMAGE" 2>/dev/null || true)" ]]; then
  say "base $BASE_IMAGE exists, reused"
else
  started=$SECONDS
  mirror="${DEBIAN_MIRROR:-$(debian_mirror)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$(mktemp -d /var/tmp/threads-connector-rootfs.XXXXXX)"
  ctr=""
  cleanup() {
    if [[ -n "$ctr" ]]; then bah rm "$ctr" >/dev/null 2>&1 || true; fi
    $SUDO rm -rf "$rootfs"
  }
  trap cleanup EXIT
  say "debootstrap $SUITE from $mirror"
  $SUDO debootstrap --variant=minbase \
    --include="$PACKAGES" \
    "$SUITE" "$rootfs" "$mirror" >/dev/null
  # No package caches or lists in the image (the official slim image has none either).
  $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr="$(bah from scratch)"
  mnt="$(bah mount "$ctr")"
  $SUDO cp -a "$rootfs"/. "$mnt"/
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="Debian $SUITE minbase with python3 (debootstrap)" \
    "$ctr"
  bah commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
  cleanup
  trap - EXIT
  say "base $((SECONDS - started)) s ($BASE_IMAGE)"
fi

if [[ "${BASE_ONLY:-}" == 1 ]]; then
  exit 0  # CI makes the base while other tools install (make tools-image)
fi

# -- 3. the project's Dockerfile ----------------------------------------------------------------
started=$SECONDS
mounts=()
if [[ -f "$CA_BUNDLE" ]]; then
  mounts=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
previous="$(bah images --quiet --no-trunc "$IMAGE" 2>/dev/null || true)"
bah bud --isolation chroot --network host "${mounts[@]}" \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" \
  --file "$ROOT/Dockerfile" --tag "$IMAGE" "$ROOT"
# The image this tag named before, now untagged: with vfs each image is a full copy on disk.
if [[ -n "$previous" && "$previous" != "$(bah images --quiet --no-trunc "$IMAGE")" ]]; then
  bah rmi "$previous" >/dev/null 2>&1 || true  # (kept while a container still uses it)
fi
say "build $((SECONDS - started)) s ($IMAGE)"
