#!/bin/bash
# One device call for issue 5's bf16 path: a release build with CUDA; the gpu suite (every op,
# the bf16 kernels and the bf16 graph against the CPU backend, 20 steps within 1e-2); the MoE
# layer against PyTorch (bench/gpu-moe.sh: autograd check, then the peers in the same call);
# flash attention alone (bench_flash, when built); bench_train_gpu on issue 5's 2.4 B MoE with
# the bf16 graph. From the repo root, through the device tool with carry [".device"]:
#   source .device/on-device.sh && SEMOE_COMMIT=<hash> bash bench/gpu-bf16.sh [parts]
# the worker (bench/gpu-worker.sh: 30 demo steps on cpu fp32, cuda fp32 and cuda bf16).
# parts (default all): any of build tests moe flash train worker, comma-separated. ROUNDS=N
# repeats the MoE layer and its peers N times, alternating, and gives the median ratios.
# Everything it prints goes to $OUT/gpu-bf16.log; JSON next to it.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-bf16.log") 2>&1
parts=${1:-build,tests,moe,flash,train,worker}
has() { [[ ",$parts," == *",$1,"* ]]; }
export NCCL_NVLS_ENABLE=0
echo "== semoe bench/gpu-bf16.sh ($parts)  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
[ -d build-rel ] || meson setup build-rel -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-rel >"$out/build.log" 2>&1 || { grep -A6 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"

if has tests; then
  timeout 240 meson test -C build-rel --suite gpu --no-rebuild --num-processes 1 >"$out/gpu-tests.txt" 2>&1
  grep -E "^ *[0-9]+/|^Ok|^Fail" "$out/gpu-tests.txt"
  cp build-rel/meson-logs/testlog.txt "$out/gpu-testlog.txt" 2>/dev/null
  grep -hE "^(config|training|step|refusals|FAIL)|rel [0-9.e-]+ .*(ok|FAIL)|worst" "$out/gpu-testlog.txt" | grep -v "^step" | head -80
  grep -hE "^step .*GPU bf16" "$out/gpu-testlog.txt" | head -20
  echo "== tests ${SECONDS}s"
fi

if has moe; then
  BUILD=build-rel OUT="$out/moe" timeout $((190 + 140 * (${ROUNDS:-1} - 1))) \
    bash bench/gpu-moe.sh >/dev/null 2>&1
  sed -n '/^device /,$p' "$out/moe/gpu-moe.log"
  echo "== moe ${SECONDS}s"
fi

if has flash && [ -x build-rel/bench/bench_flash ]; then
  timeout 120 build-rel/bench/bench_flash --json "$out/flash.json"
  echo "== bench_flash exited $?, ${SECONDS}s"
fi

if has worker; then
  OUT="$out/worker" timeout 200 bash bench/gpu-worker.sh build-rel >/dev/null 2>&1
  grep -E "^==" "$out/worker/gpu-worker.log"
  echo "== worker ${SECONDS}s"
fi

if has train; then
  left=$((585 - SECONDS))
  ((left > 60)) || { echo "== no time left for bench_train_gpu"; exit 0; }
  timeout $left build-rel/bench/bench_train_gpu --backend bf16 --micro ${MICRO:-32} --steps 4 \
    --warmup 2 --json "$out/train-gpu-bf16.json"
  echo "== bench_train_gpu bf16 exited $?, ${SECONDS}s"
fi
