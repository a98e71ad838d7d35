#!/bin/bash
# One device call for the NCCL data plane (issue 6) on a machine of two or more GPUs: a release
# build with CUDA, the gpu suite (with tests/test_gpu_nccl.c, the communicator;
# tests/test_gpu_ep.c, the daemons on two GPUs against one), then bench_nccl (our
# all-to-all and bucketed all-reduce against NCCL's own on the same communicator). From the repo
# root, through the device tool (kind nvidia-h200-x2 or larger) with carry [".device"]:
#   source .device/on-device.sh && SEMOE_COMMIT=<hash> bash bench/gpu-nccl.sh [parts]
# parts (default build,test,bench), comma-separated. Everything it prints goes to
# $OUT/gpu-nccl.log; JSON next to it.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-nccl.log") 2>&1
parts=${1:-build,test,bench}
has() { [[ ",$parts," == *",$1,"* ]]; }
export NCCL_NVLS_ENABLE=0
echo "== semoe bench/gpu-nccl.sh ($parts)  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
[ -d build-rel ] || meson setup build-rel -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-rel >"$out/build.log" 2>&1 || { grep -A6 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"
if has test; then
  # the whole gpu suite (gpu_ep_bf16 and gpu_ep's part (0) run on one GPU too)
  timeout 480 meson test -C build-rel --no-rebuild --suite gpu >"$out/test.txt" 2>&1
  grep -E "^ *[0-9]+/|^Ok|^Fail" "$out/test.txt"
  cp build-rel/meson-logs/testlog.txt "$out/testlog.txt" 2>/dev/null
  # the expert exchange in two hops: the GPUs as two emulated hosts
  SEMOE_EMULATE_HOSTS=2 timeout 300 meson test -C build-rel --no-rebuild --suite gpu gpu_ep \
    >"$out/test-2hosts.txt" 2>&1
  grep -E "^ *[0-9]+/" "$out/test-2hosts.txt" | sed 's/$/   (SEMOE_EMULATE_HOSTS=2)/'
  cp build-rel/meson-logs/testlog.txt "$out/testlog-2hosts.txt" 2>/dev/null
  grep -hE "^(rank|abort|survivor|a communicator|[0-9]+ ranks|W=|refusals)|^  (ref|ep|crash)|FAIL|failed|passed|skipped" \
    "$out/testlog.txt" | head -80
  echo "== test ${SECONDS}s"
fi
if has bench; then
  timeout 240 build-rel/bench/bench_nccl --json "$out/nccl.json"
  echo "== bench_nccl exited $?, ${SECONDS}s"
  python3 - "$out/nccl.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = {(r['coll'], r['bytes']): r for r in rows if r['impl'] == 'nccl'}
print('\n| collective | GPUs | MiB | ours GB/s (bus) | NCCL GB/s (bus) | share of NCCL |')
print('|---|---|---|---|---|---|')
for r in rows:
    if r['impl'] != 'semoe' or 'busbw_gbs' not in r:
        continue
    n = ref.get((r['coll'], r['bytes']))
    share = f"{100 * r['busbw_gbs'] / n['busbw_gbs']:.1f}%" if n and n['busbw_gbs'] else '-'
    print(f"| {r['coll']} | {r['gpus']} | {r['bytes'] / 2**20:.0f} | {r['busbw_gbs']} | "
          f"{n['busbw_gbs'] if n else '-'} | {share} |")
for r in rows:
    if r['coll'] == 'alltoall_beside_allreduce':
        print(f"\n{r['bytes'] / 2**20:.0f} MiB all-to-all right after {r['allreduce_bytes'] / 2**20:.0f} "
              f"MiB of gradients went to the background lane: done after {r['ms']} ms (alone "
              f"{r['alone_ms']}, the all-reduce alone {r['allreduce_ms']}; on one stream "
              f"{r['alone_ms'] + r['allreduce_ms']:.3f})")
PY
fi
