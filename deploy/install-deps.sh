#!/bin/sh
# Installs what semoe needs to build, test and run its demo on Debian 12, and nothing that is
# already there. Idempotent; uses sudo when not root. Usage: deploy/install-deps.sh [--test]
#   --test   also what `make test` needs (clang for the sanitizer build)
set -eu
pkgs="build-essential pkg-config meson ninja-build libzmq3-dev libmsgpack-dev libuv1-dev
      libcjson-dev libopenblas-dev fortunes"
[ "${1:-}" = "--test" ] && pkgs="$pkgs clang libclang-rt-dev"

missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    missing="$missing $p"
done
[ -z "$missing" ] && { echo "install-deps: everything is installed"; exit 0; }

if [ "$(id -u)" -eq 0 ]; then sudo=""
elif command -v sudo >/dev/null 2>&1; then sudo="sudo"
else echo "install-deps: missing:$missing; run as root or install sudo" >&2; exit 1
fi
echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get update -qq; then
  echo "install-deps: apt cannot reach its package sources (offline?). Install by hand:$missing" >&2
  echo "  (air-gapped hosts: see deploy/README.md)" >&2
  exit 1
fi
if ! $sudo apt-get install -y -qq --no-install-recommends $missing; then
  echo "install-deps: apt-get install failed for:$missing" >&2
  exit 1
fi
