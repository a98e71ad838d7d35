#!/bin/bash
# One device call for the elastic benchmark on the GPU machine's CPU cores: a release build of
# the CPU programs, then bench_skew (bench/README.md) with 8 workers of one thread each, static
# placement against live rebalancing in one run, and the death/join times; at hidden 256, then
# 384 while the call has time. Run through the device tool from the repo root, after
#   ../shared/device/prepare.sh fortunes-min fortunes     (the demo job's data)
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
# the demo job's data, the fortunes, come in .device/debs (prepare.sh fortunes-min fortunes)
sys=${SEMOE_DEVICE_SYS:-/tmp/device-sys}
sed "s#/usr/share/games/fortunes#$sys/usr/share/games/fortunes#" deploy/jobs/demo.json \
  >"$out/job.json"
for h in ${SKEW_HIDDEN:-256 384}; do
  if ((SECONDS > 330)); then echo "== no time left for --hidden $h"; break; fi
  echo "== bench_skew --workers 8 --hidden $h  (${SECONDS}s into the call)"
  mkdir -p "$out/skew-h$h"
  build-cpu/bench/bench_skew --workers 8 --hidden "$h" --job "$out/job.json" \
    --dir "$out/skew-h$h" --json "$out/skew-8x1-h$h.json" --timeout-s 200 ||
    echo "== bench_skew --hidden $h failed: $?"
done
