#!/bin/bash
# What the MoE layer's step sustains, and at what clock and power: bench_moe_layer --hold on
# each of VARIANTS (as in bench/gpu-moe-ab.sh: a path, then comma-separated environment
# settings, e.g. fused,SEMOE_MOE_GEMM_SMS=124 for our kernel on 124 SMs; `peer`: PyTorch's
# grouped_mm layer held the same way, bench/peer_hold.py), ROUNDS rounds
# alternating, with nvidia-smi sampling the SM clock and board power every 50 ms. Per run: the
# step's median over the second half of the hold, and the median clock, power and temperature
# over that same window; first, the dense bf16 GEMM held as long (bench/dense_sustained.py).
# From the repo root on the GPU machine, after a release build in $BUILD (default build-rel):
#   SHAPE=mixtral HOLD=6 ROUNDS=2 VARIANTS="loop fused fused,SEMOE_MOE_GEMM_SMS=124" \
#     bash bench/gpu-power.sh
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
BUILD=${BUILD:-build-rel}
SHAPE=${SHAPE:-mixtral}
HOLD=${HOLD:-6}
PEERS=${PEERS:-.device/peers/moe_layer_torch.py}
[ -f "$PEERS" ] || PEERS=../shared/peers/moe_layer_torch.py
echo "== semoe bench/gpu-power.sh  shape $SHAPE  hold ${HOLD}s  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits \
  -lms 50 >"$out/smi.csv" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT
timeout 60 python3 bench/dense_sustained.py --seconds "$HOLD" --json "$out/dense-held.json" | tail -1
: >"$out/hold.txt"
for ((r = 1; r <= ${ROUNDS:-1}; r++)); do
  for v in ${VARIANTS:-loop fused}; do
    p=${v%%,*}
    [[ $v == *,* ]] && e=${v#*,} || e=SEMOE_AB=1
    if [ "$p" = peer ]; then
      timeout 150 python3 bench/peer_hold.py --peer "$PEERS" --shape "$SHAPE" --seconds "$HOLD"
    else
      env ${e//,/ } timeout 150 "$BUILD/bench/bench_moe_layer" --gemm "$p" --shapes "$SHAPE" \
        --hold "$HOLD"
    fi | grep -E '"(semoe|peer)_hold"' | sed "s|^|$v |" >>"$out/hold.txt"
  done
done
kill $smi 2>/dev/null
python3 - "$out" <<'PY'
import datetime, json, statistics, sys
out = sys.argv[1]
smi = []
for l in open(f'{out}/smi.csv'):
    w = [x.strip() for x in l.split(',')]
    try:
        t = datetime.datetime.strptime(w[0], '%Y/%m/%d %H:%M:%S.%f').timestamp() * 1e3
        smi.append((t, float(w[1]), float(w[2]), float(w[3])))
    except (ValueError, IndexError):
        pass
flops = {'mixtral': 3 * 2 * 16384 * 2 * 3 * 4096 * 14336, 'deepseek': 3 * 2 * 16384 * 6 * 3 * 2048 * 1408,
         'small': 3 * 2 * 8192 * 2 * 3 * 1024 * 2816}
runs = {}
for l in open(f'{out}/hold.txt'):
    v, js = l.split(' ', 1)
    r = json.loads(js)
    runs.setdefault(v, []).append(r['ms'])
    win = [s for s in smi if r['from_unix_ms'] <= s[0] <= r['to_unix_ms']]
    med = lambda i: statistics.median(s[i] for s in win) if win else float('nan')
    tf = flops.get(r['shape'], 0) / (r['ms'] * 1e9)
    print(f'{v:40} {r["ms"]:8.3f} ms  {tf:6.1f} TFLOP/s  sm {med(1):5.0f} MHz  {med(2):4.0f} W  '
          f'{med(3):3.0f} C  ({len(win)} samples, {r["steps"]} steps)')
if 'peer' in runs:  # held steps: the peer's time over ours, round by round and the medians
    pm = statistics.median(runs['peer'])
    for v, ms in runs.items():
        if v != 'peer':
            per = ', '.join(f'{p / m:.3f}' for p, m in zip(runs['peer'], ms))
            print(f'held ratio {v:32} {pm / statistics.median(ms):.3f}x (rounds: {per})')
PY
