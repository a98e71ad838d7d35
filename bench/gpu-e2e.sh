#!/bin/bash
# One device call for the CUDA backend's state: a release build with CUDA, the gpu suite (every
# op, the whole model and checkpoints against the CPU backend; flash attention; the bf16-GEMM
# table), then bench_train_gpu on issue 5's 2.4B-parameter MoE (bf16mm; then f32 if time is
# left). From the repo root, through the device tool with carry [".device"]:
#   source .device/on-device.sh && bash bench/gpu-e2e.sh
# Everything it prints goes to $OUT/gpu-e2e.log; the benches' JSON to $OUT/train-gpu-*.json.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-e2e.log") 2>&1
echo "== semoe bench/gpu-e2e.sh  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -d build-rel ] || meson setup build-rel -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-rel >"$out/build.log" 2>&1 || { grep -A6 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"
timeout 200 meson test -C build-rel --suite gpu --no-rebuild --num-processes 1 >"$out/gpu-tests.txt" 2>&1
grep -E "^ *[0-9]+/|^Ok|^Fail" "$out/gpu-tests.txt"
cp build-rel/meson-logs/testlog.txt "$out/gpu-testlog.txt" 2>/dev/null
grep -hE "^(flash|table|  T=|fwd|B=)|FAIL" "$out/gpu-testlog.txt" | head -60
echo "== tests ${SECONDS}s"
timeout 240 build-rel/bench/bench_train_gpu --backend bf16mm --json "$out/train-gpu-bf16mm.json"
echo "== bench_train_gpu bf16mm exited $?, ${SECONDS}s"
if ((SECONDS < 380)); then
  timeout $((560 - SECONDS)) build-rel/bench/bench_train_gpu --backend f32 --steps 2 --warmup 1 \
    --json "$out/train-gpu-f32.json"
  echo "== bench_train_gpu f32 exited $?, ${SECONDS}s"
fi
