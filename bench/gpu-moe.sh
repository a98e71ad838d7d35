#!/bin/bash
# One device call for the bf16 MoE layer (gpu/moe_layer.h) against PyTorch's grouped_mm: build
# release with CUDA, run bench_moe_layer on the peers' three shapes (every GEMM path) with a
# dump, check the dump against PyTorch autograd (bench/moe_check.py), run the PyTorch peers
# (../shared/peers/moe_layer_torch.py, carried as .device/peers/), print a comparison table.
# From the repo root, through the device tool with carry [".device"]:
#   source .device/on-device.sh && [ROUNDS=3] [HOLD=6] bash bench/gpu-moe.sh
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
# the dense GEMM's rate held for seconds (at the power cap), beside the 30 ms burst the benches
# call the dense peak
timeout 60 python3 bench/dense_sustained.py --seconds 4 --json "$out/sustained.json" | tail -3
# ROUNDS > 1: semoe and the peers again, alternating, for the spread of the ratios (the run-to-run
# noise of one pair is a few percent); the table gives each round and the median
for ((r = 2; r <= ${ROUNDS:-1}; r++)); do
  timeout 200 "$BUILD/bench/bench_moe_layer" --json "$out/semoe-$r.json" >/dev/null
  [ -n "$PEERS" ] && timeout 240 python3 "$PEERS" "$out/peers-$r.json" >/dev/null
  echo "== round $r done, ${SECONDS}s"
done

python3 - "$out" "${ROUNDS:-1}" <<'PY'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def lines(p):
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
def peer(p):
    return json.load(open(p)) if os.path.exists(p) else []
runs = [(lines(f'{out}/semoe.json'), peer(f'{out}/peers.json'))]
runs += [(lines(f'{out}/semoe-{r}.json'), peer(f'{out}/peers-{r}.json')) for r in range(2, rounds + 1)]
semoe, peers = runs[0]
dense = next((r['tflops'] for r in semoe if r.get('impl') == 'dense_gemm_8192'), None)
pdense = next((r['tflops'] for r in peers if r.get('impl') == 'dense_gemm_8192'), None)
import datetime, subprocess
try:
    gpu = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                         capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    gpu = []
print(f'\ndevice {gpu[0] if gpu else "?"}, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}, '
      f'commit {os.environ.get("SEMOE_COMMIT", "?")}')
sus = json.load(open(f'{out}/sustained.json')) if os.path.exists(f'{out}/sustained.json') else {}
print(f'dense bf16 8192^3: semoe cuBLAS {dense} TFLOP/s, torch {pdense} TFLOP/s (30 ms bursts); '
      f'held for 4 s: {sus.get("tflops", "?")} TFLOP/s at {sus.get("mhz", "?")} MHz, '
      f'{sus.get("watts", "?")} W\n')
key = lambda r: (r['T'], r['d'], r['f'], r['E'], r['k'])
def ratio(run, r):
    g = next((p for p in run[1] if p.get('impl') == 'grouped_mm' and 'T' in p and key(p) == key(r)), None)
    return (r['tok_s'] / g['tok_s'] if g and g.get('tok_s') else None), g
print('| T, d, f, E, k | semoe gemm | semoe ms | semoe tok/s | grouped_mm tok/s | ratio | semoe TFLOP/s | % dense | % held |'
      + (' ratio per round | median |' if rounds > 1 else ''))
print('|---|---|---|---|---|---|---|---|---|' + ('---|---|' if rounds > 1 else ''))
for r in semoe:
    if r.get('impl') != 'semoe':
        continue
    q, g = ratio(runs[0], r)
    gt = g.get('tok_s') if g else None
    row = (f'| {", ".join(map(str, key(r)))} | {r["gemm"]} | {r["ms"]:.2f} | {r["tok_s"]:.0f} | '
           f'{gt if gt else (g or {}).get("error", "-")} | {f"{q:.2f}x" if q else "-"} | '
           f'{r["tflops"]} | {r["pct_dense"]}% | '
           + (f'{100 * r["tflops"] / sus["tflops"]:.1f}% |' if sus.get('tflops') else '- |'))
    if rounds > 1:
        qs = []
        for run in runs:
            same = next((x for x in run[0] if x.get('impl') == 'semoe' and key(x) == key(r)
                         and x['gemm'] == r['gemm']), None)
            qq = ratio(run, same)[0] if same else None
            if qq:
                qs.append(qq)
        row += f' {", ".join(f"{x:.3f}" for x in qs)} | {statistics.median(qs):.3f}x |' if qs else ' - | - |'
    print(row)
PY
# HOLD > 0 (default 6): the Mixtral step and the peer's held back to back for HOLD s each,
# ROUNDS rounds alternating, at the power cap where a training job runs (bench/gpu-power.sh):
# the held ratio, beside the table's 10-step bursts, whose clocks depend on what ran before
if [ -n "$PEERS" ] && [ "${HOLD:-6}" != 0 ]; then
  echo
  echo "== held: the Mixtral step, ours on its default path and the peer's, ${HOLD:-6} s each, alternating"
  PEERS=$PEERS BUILD=$BUILD OUT="$out/held" SHAPE=mixtral HOLD=${HOLD:-6} ROUNDS=${ROUNDS:-1} \
    VARIANTS="peer loop" timeout 300 bash bench/gpu-power.sh | tail -n +2
fi
echo "== done ${SECONDS}s (moe_check exit $check)"
exit $check
