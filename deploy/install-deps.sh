#!/bin/sh
# Installs what semoe needs to build, test and run its demo on Debian 12, and nothing that is
# already there. Idempotent; uses sudo when not root.
#   deploy/install-deps.sh [--test]          install from the configured apt sources
#   deploy/install-deps.sh --download DIR    (online host) fetch the .debs an air-gapped
#                                            host needs, with their dependencies, into DIR
#   deploy/install-deps.sh --from DIR        (air-gapped host) install the .debs in DIR
#   --test   also what `make test` needs (clang for the sanitizer build)
set -eu
pkgs="build-essential pkg-config meson ninja-build libzmq3-dev libmsgpack-dev libuv1-dev
      libcjson-dev libopenblas-dev fortunes"
mode=install dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test) pkgs="$pkgs clang libclang-rt-dev" ;;
    --download) mode=download dir="${2:?--download needs a directory}"; shift ;;
    --from) mode=from dir="${2:?--from needs a directory}"; shift ;;
    *) echo "install-deps: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = download ]; then
  # Resolve the full dependency closure as a bare Debian 12 host would need it.
  mkdir -p "$dir" && cd "$dir"
  apt-get update -qq
  closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances $pkgs | grep '^[a-z0-9]' | sort -u)
  apt-get download $closure
  echo "install-deps: $(ls ./*.deb | wc -l) packages in $dir; on the air-gapped host run:"
  echo "  deploy/install-deps.sh --from $dir"
  exit 0
fi

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
if [ "$mode" = from ]; then
  $sudo dpkg -i "$dir"/*.deb || { echo "install-deps: dpkg -i $dir/*.deb failed" >&2; exit 1; }
  exit 0
fi
if ! $sudo apt-get update -qq; then
  echo "install-deps: apt cannot reach its package sources (offline?). Install by hand:$missing" >&2
  echo "  (air-gapped hosts: see deploy/README.md)" >&2
  exit 1
fi
if ! $sudo apt-get install -y -qq --no-install-recommends $missing; then
  echo "install-deps: apt-get install failed for:$missing" >&2
  exit 1
fi
