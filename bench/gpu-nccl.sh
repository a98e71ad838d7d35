#!/bin/bash
# One device call for the NCCL data plane (issue 6) on a machine of two or more GPUs: a release
# build with CUDA, the gpu suite (with tests/test_gpu_nccl.c, the communicator;
# tests/test_gpu_ep.c, the daemons on two GPUs against one), then bench_nccl (our
# all-to-all and bucketed all-reduce against NCCL's own on the same communicator). From the repo
# root, through the device tool (kind nvidia-h200-x2 or larger) with carry [".device"]:
#   source .device/on-device.sh && SEMOE_COMMIT=<hash> bash bench/gpu-nccl.sh [parts]
# parts (default build,bench,test, run in that order; and skew, for a call of its own, after
# ../shared/device/prepare.sh fortunes-min fortunes), comma-separated. skew: bench_skew on the
# GPUs (2 workers, one GPU each, bf16 expert parallelism over NCCL, Mixtral's proportions at
# hidden 1024: 8 experts of 3584, top-2, 8192 tokens a GPU a step) balanced (--bias 0), then
# with two hot experts on one GPU: static against rebalanced throughput, and a worker's death
# and a join (the time to training resumed). Everything it prints
# goes to $OUT/gpu-nccl.log, bench_nccl's JSON to $OUT/nccl.json, and every other file (the
# test logs) into $OUT/gpu-nccl-files.tgz (the device tool brings back few files).
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-nccl.log") 2>&1
parts=${1:-build,bench,test}
has() { [[ ",$parts," == *",$1,"* ]]; }
export NCCL_NVLS_ENABLE=0
echo "== semoe bench/gpu-nccl.sh ($parts)  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
ngpu=$(nvidia-smi -L | wc -l)
if [ "$ngpu" -ge 2 ]; then
  export SEMOE_REQUIRE_GPUS=2 # gpu_ep and gpu_nccl's parts on two GPUs may not skip
else
  echo "== WARNING: $ngpu GPU: the parts on two GPUs skip, bench_nccl cannot run"
fi
pack() { # everything but the log and the JSON into one archive
  (cd "$out" && ls | grep -vE '^(gpu-nccl\.log|nccl\.json|gpu-nccl-files\.tgz)$' |
     tar czf gpu-nccl-files.tgz --remove-files -T - 2>/dev/null)
}
trap pack EXIT
# the device tool kills a command at 600 s, before the trap could pack: every step's limit is
# cut to what is left of BUDGET seconds (default 570)
BUDGET=${BUDGET:-570}
lim() { local l=$((BUDGET - SECONDS - ${2:-0})); echo $((l < $1 ? (l > 1 ? l : 1) : $1)); }
[ -d build-rel ] || meson setup build-rel -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-rel >"$out/build.log" 2>&1 || { grep -A6 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"
if has bench; then
  timeout -k 5 "$(lim 150 10)" build-rel/bench/bench_nccl --json "$out/nccl.json"
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
if has skew; then
  sys=${SEMOE_DEVICE_SYS:-/tmp/device-sys}
  sed "s#/usr/share/games/fortunes#$sys/usr/share/games/fortunes#" deploy/jobs/demo.json \
    >"$out/job.json"
  ninja -C build-rel bench/bench_skew cli/semoe >>"$out/build.log" 2>&1
  export SEMOE_BUILD=$PWD/build-rel
  args=(--workers 2 --gpus 2 --bf16 --hidden 1024 --intermediate 3584 --layers 4 --experts 8
        --top-k 2 --seq-len 1024 --global-batch 16 --micro-batch 8 --job "$out/job.json"
        --timeout-s 200)
  for run in balanced skewed; do
    extra=(); [ $run = balanced ] && extra=(--bias 0 --no-faults)
    echo "== bench_skew $run (${SECONDS}s into the call)"
    mkdir -p "$out/skew-$run"
    timeout -k 5 "$(lim 230 10)" build-rel/bench/bench_skew "${args[@]}" "${extra[@]}" --dir "$out/skew-$run" \
      --json "$out/skew-$run.json" || echo "== bench_skew $run failed: $?"
  done
fi
if has test; then
  # the whole gpu suite (gpu_ep_bf16 and gpu_ep's part (0) run on one GPU too)
  timeout -k 5 "$(lim 420 60)" meson test -C build-rel --no-rebuild --suite gpu >"$out/test.txt" 2>&1
  grep -E "^ *[0-9]+/|^Ok|^Fail" "$out/test.txt"
  cp build-rel/meson-logs/testlog.txt "$out/testlog.txt" 2>/dev/null
  grep -hE "^(rank|abort|survivor|a communicator|[0-9]+ ranks|W=|refusals)|^  [a-z0-9-]+:|FAIL|failed|passed|skipped" \
    "$out/testlog.txt" | head -80
  # the expert exchange in two hops: the GPUs as two emulated hosts, on the parts whose experts
  # are split ((1) and (3)); only if gpu_ep passed as it is (else it would fail the same way)
  if grep -qE "gpu_ep +OK" "$out/test.txt" && ((BUDGET - SECONDS > 60)); then
    SEMOE_EMULATE_HOSTS=2 SEMOE_GPU_EP_PARTS=1,3 timeout -k 5 "$(lim 240 10)" meson test -C build-rel --no-rebuild \
      --suite gpu gpu_ep >"$out/test-2hosts.txt" 2>&1
    grep -E "^ *[0-9]+/" "$out/test-2hosts.txt" | sed 's/$/   (SEMOE_EMULATE_HOSTS=2, parts 1 and 3)/'
    cp build-rel/meson-logs/testlog.txt "$out/testlog-2hosts.txt" 2>/dev/null
    grep -hE "^  [a-z0-9-]+:|FAIL|failed|passed" "$out/testlog-2hosts.txt" | head -20
  fi
  echo "== test ${SECONDS}s"
fi
