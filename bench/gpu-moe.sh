#!/bin/bash
# One device call for the bf16 MoE layer (gpu/moe_layer.h) against PyTorch's grouped_mm: build
# release with CUDA, run bench_moe_layer on the peers' three shapes (every GEMM path) with a
# dump, check the dump against PyTorch autograd (bench/moe_check.py), run the PyTorch peers
# (../shared/peers/moe_layer_torch.py, carried as .device/peers/), print a comparison table.
# From the repo root, through the device tool with carry [".device"]:
#   source .device/on-device.sh && bash bench/gpu-moe.sh
# Everything it prints goes to $OUT/gpu-moe.log; the JSON to $OUT/semoe.json, $OUT/peers.json.
# The dump (~0.7 GB) goes to $DUMP, outside $OUT, so that it does not travel back.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-moe.log") 2>&1
PEERS=${PEERS:-}
if [ -z "$PEERS" ]; then
  for p in .device/peers/moe_layer_torch.py ../shared/peers/moe_layer_torch.py; do
    [ -f "$p" ] && { PEERS=$p; break; }
  done
fi
DUMP=${DUMP:-/tmp/semoe-moe-dump}
BUILD=${BUILD:-build-rel}
echo "== semoe bench/gpu-moe.sh  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
[ -d "$BUILD" ] || meson setup "$BUILD" -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C "$BUILD" bench/bench_moe_layer >"$out/build.log" 2>&1 ||
  { grep -A5 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== build ${SECONDS}s"

rm -rf "$DUMP"
timeout 200 "$BUILD/bench/bench_moe_layer" --phases --dump "$DUMP" --json "$out/semoe.json"
echo "== bench_moe_layer exited $?, ${SECONDS}s"
timeout 90 python3 bench/moe_check.py "$DUMP"
check=$?
echo "== moe_check exited $check, ${SECONDS}s"
rm -rf "$DUMP"

if [ -n "$PEERS" ]; then
  timeout 240 python3 "$PEERS" "$out/peers.json"
  echo "== peers exited $?, ${SECONDS}s"
else
  echo "== no peer script (PEERS, .device/peers/ or ../shared/peers/): no comparison"
fi

python3 - "$out/semoe.json" "$out/peers.json" <<'PY'
import json, os, sys
semoe = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if os.path.exists(sys.argv[1]) else []
peers = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else []
dense = next((r['tflops'] for r in semoe if r.get('impl') == 'dense_gemm_8192'), None)
pdense = next((r['tflops'] for r in peers if r.get('impl') == 'dense_gemm_8192'), None)
print(f'\ndense bf16 8192^3: semoe cuBLAS {dense} TFLOP/s, torch {pdense} TFLOP/s\n')
print('| T, d, f, E, k | semoe gemm | semoe ms | semoe tok/s | grouped_mm tok/s | ratio | semoe TFLOP/s | % dense |')
print('|---|---|---|---|---|---|---|---|')
key = lambda r: (r['T'], r['d'], r['f'], r['E'], r['k'])
for r in semoe:
    if r.get('impl') != 'semoe':
        continue
    g = next((p for p in peers if p.get('impl') == 'grouped_mm' and 'T' in p and key(p) == key(r)), None)
    gt = g.get('tok_s') if g else None
    ratio = f'{r["tok_s"] / gt:.2f}x' if gt else '-'
    print(f'| {", ".join(map(str, key(r)))} | {r["gemm"]} | {r["ms"]:.2f} | {r["tok_s"]:.0f} | '
          f'{gt if gt else (g or {}).get("error", "-")} | {ratio} | {r["tflops"]} | {r["pct_dense"]}% |')
PY
echo "== done ${SECONDS}s (moe_check exit $check)"
exit $check
