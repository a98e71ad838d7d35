#!/bin/bash
# One device call for the elastic benchmark on the GPU machine's CPU cores: a release build of
# the CPU programs, then bench_skew (bench/README.md) with 8 workers of one thread each, static
# placement against live rebalancing in one run, and the death/join times; twice, at hidden 256
# and 512. Run through the device tool from the repo root, after ../shared/device/prepare.sh:
#   source .device/on-device.sh && bash bench/cpu-elastic.sh
# Everything it prints goes to $OUT/cpu-elastic.log too; each run's JSON to $OUT/skew-*.json.
set -uo pipefail
out=${OUT:-/tmp/semoe-cpu-out}
mkdir -p "$out"
exec > >(tee "$out/cpu-elastic.log") 2>&1
echo "== semoe bench/cpu-elastic.sh  commit ${SEMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}  $(date -u +%FT%TZ)"
echo "== $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
meson setup build-cpu --buildtype=release -Dcuda=disabled >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-cpu bench/bench_skew coordinator/semoe-coordinator worker/semoe-worker cli/semoe \
  >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export SEMOE_BUILD=$PWD/build-cpu
for h in ${SKEW_HIDDEN:-256 512}; do
  echo "== bench_skew --workers 8 --hidden $h"
  build-cpu/bench/bench_skew --workers 8 --hidden "$h" --json "$out/skew-8x1-h$h.json" \
    --timeout-s 240 || echo "== bench_skew --hidden $h failed: $?"
done
