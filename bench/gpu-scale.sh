#!/bin/bash
# Weak scaling of training through the real daemons on 1, 2 (and 4) GPUs of one machine: issue
# 5's 2.3 B MoE (8 layers, hidden 2048, 16 heads / 4 kv heads, 8 experts of 5632, top-2, vocab
# 32000, seq 2048) in bf16 with train.collectives nccl, 32 sequences per GPU a step (tokens per
# GPU fixed), every expert on every worker (elastic.min_replicas = the workers: data parallel),
# the dense gradients and the experts' all-reduced layer by layer during backward over NCCL.
# Per run: tokens/s over the steps after the warm-up (a step's time the slowest worker's, from
# the end of its last step to the end of this one: the whole loop, data and control included),
# per GPU, the efficiency against one GPU, and MFU (bench_train_gpu's FLOPs per token,
# 6 (N_active - V D) + 6 L H hd T, over the dense bf16 GEMM rate bench/dense_sustained.py holds
# on the same machine first). With 2 GPUs or more, the share of the step's communication hidden
# behind compute, as the issue defines it: 1 - (step time on n GPUs - step time on 1) /
# communication time alone, the latter from bench_nccl on the same GPUs at the step's sizes
# (dp: the all-reduce of every gradient, fp32; ep: the dense gradients' plus 4 all-to-alls a MoE
# layer of the rows a GPU sends, 32 x 2048 tokens x top-2 x hidden in bf16). The logs go into
# $OUT/gpu-scale-files.tgz. From the repo root on the GPU machine (kind nvidia-h200-x2 or larger), after
# ../shared/device/prepare.sh fortunes-min fortunes:
#   source .device/on-device.sh && SEMOE_COMMIT=<hash> GPUS="1 2" bash bench/gpu-scale.sh
# MODE=ep (default dp): the experts split over the workers instead (elastic.min_replicas 1,
# expert parallelism in the bf16 graph), each MoE layer's tokens in CHUNKS chunks
# (train.a2a_chunks, default 2) so that the all-to-all overlaps the expert GEMMs.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
build=${BUILD:-build-rel}
mkdir -p "$out"
exec > >(tee "$out/gpu-scale.log") 2>&1
pack() { # everything but the log into one archive: the device tool brings back few files
  (cd "$out" && ls | grep -vE '^gpu-scale(\.log|-files\.tgz)$' |
     tar czf gpu-scale-files.tgz --remove-files -T - 2>/dev/null)
}
trap pack EXIT
# the device tool kills a command at 600 s, before the trap could pack: every step's limit is
# cut to what is left of BUDGET seconds (default 570)
BUDGET=${BUDGET:-570}
lim() { local l=$((BUDGET - SECONDS - ${2:-0})); echo $((l < $1 ? (l > 1 ? l : 1) : $1)); }
export NCCL_NVLS_ENABLE=0
STEPS=${STEPS:-8}
MODE=${MODE:-dp}
CHUNKS=${CHUNKS:-2}
WARM=${WARM:-3}
echo "== semoe bench/gpu-scale.sh  GPUs ${GPUS:-1 2}  mode $MODE (chunks $CHUNKS)  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -d "$build" ] || meson setup "$build" -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C "$build" coordinator/semoe-coordinator worker/semoe-worker bench/bench_nccl >"$out/build.log" 2>&1 ||
  { grep -A5 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"
timeout -k 5 60 python3 bench/dense_sustained.py --seconds 4 --json "$out/dense.json" | tail -1

sys=${SEMOE_DEVICE_SYS:-/tmp/device-sys}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for n in ${GPUS:-1 2}; do
  python3 - "$sys" "$out/job-$n.json" "$n" "$STEPS" "$MODE" "$CHUNKS" <<'PY'
import json, sys
job = json.load(open("deploy/jobs/demo.json"))
n = int(sys.argv[3])
job["data"]["paths"] = [sys.argv[1] + "/usr/share/games/fortunes"]
job["model"].update(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048)
job["train"].update(seq_len=2048, global_batch=32 * n, micro_batch=32, steps=int(sys.argv[4]),
                    eval_interval=1000000, checkpoint_dir="", checkpoint_interval=0,
                    precision="bf16", collectives="nccl")
job["cluster"].update(expected_workers=n, heartbeat_ms=1000, liveness=10)
ep = sys.argv[5] == "ep"
job["train"]["a2a_chunks"] = int(sys.argv[6]) if ep else 1
job["elastic"].update(min_replicas=1 if ep else n, threshold=1e9)
json.dump(job, open(sys.argv[2], "w"), indent=1)
PY
  ctl="tcp://127.0.0.1:$(port)" st="tcp://127.0.0.1:$(port)" met="127.0.0.1:$(port)"
  # bounded: a worker that dies (out of memory, say) leaves the coordinator waiting for it
  t=$(lim 200 60) # the later runs and bench_nccl keep a minute
  timeout -k 5 "$t" "$build"/coordinator/semoe-coordinator --config "$out/job-$n.json" --bind "$ctl" \
      --status "$st" --metrics "$met" 2>"$out/coordinator-$n.log" &
  cpid=$!
  pids=()
  for ((i = 0; i < n; i++)); do
    timeout -k 5 "$t" "$build"/worker/semoe-worker --coordinator "$ctl" --device "cuda:$i" \
        --id "g$n-w$i" --metrics-log "$out/train-$n-w$i.jsonl" 2>"$out/worker-$n-w$i.log" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  sleep 1; kill $cpid 2>/dev/null; wait $cpid
  echo "== $n GPU(s) done, ${SECONDS}s"
  grep -hE " E |NCCL communicator" "$out"/worker-$n-w*.log | head -4
done
# the communication alone, at the step's sizes (MiB): gradients all-reduced, rows sent a transfer
read ar_mib a2a_mib < <(python3 -c '
L, d, f, E, V, H, KV, hd = 8, 2048, 5632, 8, 32000, 16, 4, 128
dense = 2 * V * d + L * (d * (H + 2 * KV) * hd + H * hd * d + 2 * d + d * E) + d
experts = L * E * 3 * d * f
ep = "'"$MODE"'" == "ep"
print(round(4 * (dense if ep else dense + experts) / 2**20), round(32 * 2048 * 2 * d * 2 / 2**20))')
for n in ${GPUS:-1 2}; do
  ((n < 2)) && continue
  timeout -k 5 "$(lim 90 15)" "$build"/bench/bench_nccl --gpus "$n" --only allreduce --mib "$ar_mib" \
    --json "$out/comm-ar-$n.json" >/dev/null || echo "== bench_nccl allreduce on $n GPUs failed"
  if [ "$MODE" = ep ]; then
    timeout -k 5 "$(lim 90 15)" "$build"/bench/bench_nccl --gpus "$n" --only alltoall --mib "$a2a_mib" \
      --json "$out/comm-a2a-$n.json" >/dev/null || echo "== bench_nccl alltoall on $n GPUs failed"
  fi
done
python3 - "$out" "${GPUS:-1 2}" "$WARM" "$MODE" <<'PY'
import glob, json, os, statistics, sys
out, gpus, warm, mode = sys.argv[1], [int(x) for x in sys.argv[2].split()], int(sys.argv[3]), sys.argv[4]
L, d, f, E, k, V, H, KV, hd, T = 8, 2048, 5632, 8, 2, 32000, 16, 4, 128, 2048
active = 2 * V * d + L * (d * (H + 2 * KV) * hd + H * hd * d + 2 * d + d * E + k * 3 * d * f) + d
flops_tok = 6 * (active - V * d) + 6 * L * H * hd * T  # bench_train_gpu's: no embedding lookup
dense = json.load(open(f"{out}/dense.json")).get("tflops") if os.path.exists(f"{out}/dense.json") else None
def comm_ms(n):
    ms = 0.0
    for what, times in (("ar", 1), ("a2a", 4 * L if mode == "ep" else 0)):
        if not times:
            continue
        p = f"{out}/comm-{what}-{n}.json"
        got = [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
        ours = [r["ms"] for r in got if r.get("impl") == "semoe"]
        if not ours:
            return None
        ms += times * ours[0]
    return ms
rows, base, t1 = [], None, None
for n in gpus:
    per = {}
    for p in glob.glob(f"{out}/train-{n}-w*.jsonl"):
        last = None
        for l in map(json.loads, open(p)):
            if last is not None:
                per.setdefault(l["step"], []).append(l["time"] - last)
            last = l["time"]
    steps = [s for s in sorted(per) if s > warm and len(per[s]) == n]
    if not steps:
        print(f"{n} GPU(s): no complete step after the warm-up")
        continue
    t = statistics.median(max(per[s]) for s in steps)
    tok = 32 * n * T / t
    base = base or tok / n
    t1 = t1 or (t if n == 1 else None)
    mfu = flops_tok * tok / (dense * 1e12 * n) if dense else float("nan")
    c = comm_ms(n) if n > 1 else None
    hidden = 1 - (t - t1) * 1e3 / c if c and t1 else float("nan")
    rows.append((n, t, tok, tok / n, tok / n / base, mfu, len(steps), c, hidden))
print(f"\nactive parameters {active / 1e9:.2f} B; dense bf16 held {dense} TFLOP/s a GPU\n")
print("| GPUs | step s | tokens/s | tokens/s a GPU | efficiency | MFU (held dense) | steps | comm alone ms | hidden |")
print("|---|---|---|---|---|---|---|---|---|")
for n, t, tok, tpg, eff, mfu, ns, c, hid in rows:
    cs = f"{c:.1f}" if c else "-"
    hs = f"{100 * hid:.0f}%" if hid == hid else "-"
    print(f"| {n} | {t:.3f} | {tok:.0f} | {tpg:.0f} | {100 * eff:.1f}% | {100 * mfu:.1f}% | {ns} | {cs} | {hs} |")
PY
