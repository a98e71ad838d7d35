#!/bin/bash
# A/B of the MoE layer's GEMM paths on one shape, alternating so that the GPU's thermal and
# power state falls on all alike: ROUNDS rounds of bench_moe_layer under each of VARIANTS, each
# a path (loop, streams, fused) and comma-separated environment settings after it (e.g.
# SEMOE_MOE_OWN, the GEMMs on our kernel, gpu/moe_layer.cu; SEMOE_MOE_GEMM_GROUP, its tile
# order, gpu/moe_gemm.cu), with
# the SM clock and board power sampled every 100 ms beside it. From the repo root on the GPU
# machine, after a release build in $BUILD (default build-rel):
#   SHAPE=mixtral ROUNDS=3 VARIANTS="loop fused fused,SEMOE_MOE_OWN=1,SEMOE_MOE_GEMM_GROUP=8" \
#     bash bench/gpu-moe-ab.sh
# Prints one line per run (path, group, ms, tok/s) and the per-path medians; the clock log goes
# to $OUT/clocks.csv with its summary printed per run.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
BUILD=${BUILD:-build-rel}
SHAPE=${SHAPE:-mixtral}
echo "== semoe bench/gpu-moe-ab.sh  shape $SHAPE  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader \
  -lms 100 >"$out/clocks.csv" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT
one() { # path variant
  local from=$(wc -l <"$out/clocks.csv")
  local line
  line=$(env SEMOE_AB=1 ${2//,/ } timeout 120 "$BUILD/bench/bench_moe_layer" --gemm "$1" \
    --shapes "$SHAPE" | grep '"impl": "semoe"')
  local clk
  clk=$(tail -n +$((from + 1)) "$out/clocks.csv" | awk -F', ' '{gsub(/ MHz/,"",$2); gsub(/ W/,"",$3);
    c+=$2; p+=$3; n++} END {if (n) printf "sm %.0f MHz, %.0f W (%d samples)", c/n, p/n, n}')
  python3 -c '
import json, sys
r = json.loads(sys.argv[1])
ms, tok, pct = r["ms"], r["tok_s"], r["pct_dense"]
print(f"{sys.argv[2]:6} {sys.argv[3]:40}  {ms:.3f} ms  {tok:.0f} tok/s  {pct}% dense  "
      + sys.argv[4])' "$line" "$1" "$2" "$clk" | tee -a "$out/ab.txt"
}
for ((r = 1; r <= ${ROUNDS:-3}; r++)); do
  for v in ${VARIANTS:-loop fused}; do
    p=${v%%,*}
    [[ $v == *,* ]] && e=${v#*,} || e=SEMOE_AB=1
    one "$p" "$e"
  done
done
python3 - "$out/ab.txt" <<'PY'
import collections, statistics, sys
ms = collections.defaultdict(list)
for l in open(sys.argv[1]):
    w = l.split()
    ms[(w[0], w[1])].append(float(w[2]))
for (p, g), v in ms.items():
    print(f'median {p:6} {g:40}: {statistics.median(v):.3f} ms over {len(v)} ({", ".join(f"{x:.2f}" for x in v)})')
PY
