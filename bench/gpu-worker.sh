#!/bin/bash
# One device call for training through semoe-worker on a GPU: the demo model (2 heads of 64 on
# 1 kv head, so that the bf16 flash kernels take it) for 30 steps, one run per configuration
# (a worker on the CPU in fp32, one on cuda:0 in fp32, one on cuda:0 with train.precision bf16,
# each of the two on cuda:0 also with train.collectives nccl), same job and seed, losses
# compared step by step with the CPU's, and each nccl run's with its zmq twin's (within 1e-6 in
# fp32, 1e-2 in bf16, the CPU bound: one rank, so the collectives change nothing, but atomics
# (gpu/rows.cu's scatter-adds, the flash backward's dQ) make runs differ in the last bits, and
# bf16 roundings carry that to 9e-4 in 30 steps). From the repo root,
# after ../shared/device/prepare.sh fortunes-min fortunes (the demo job's data):
#   source .device/on-device.sh && bash bench/gpu-worker.sh [BUILD_DIR]
# BUILD_DIR (default build-rel) is built with CUDA first if it does not exist. Everything it
# prints goes to $OUT/gpu-worker.log too; the metrics lines to $OUT/train-*.jsonl.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
build=${1:-build-rel}
mkdir -p "$out"
exec > >(tee "$out/gpu-worker.log") 2>&1
echo "== semoe bench/gpu-worker.sh  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -d "$build" ] || meson setup "$build" -Dcuda=enabled --buildtype=release >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C "$build" coordinator/semoe-coordinator worker/semoe-worker >"$out/build.log" 2>&1 ||
  { grep -A5 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== built ${SECONDS}s"

sys=${SEMOE_DEVICE_SYS:-/tmp/device-sys}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for run in cpu-fp32 cuda-fp32 cuda-fp32-nccl cuda-bf16 cuda-bf16-nccl; do
  dev=${run%%-*} rest=${run#*-}
  prec=${rest%%-*} coll=zmq
  [[ $rest == *-nccl ]] && coll=nccl
  [ "$dev" = cuda ] && dev=cuda:0
  python3 - "$sys" "$out/job-$run.json" "$prec" "$coll" <<'PY'
import json, sys
job = json.load(open("deploy/jobs/demo.json"))
job["data"]["paths"] = [sys.argv[1] + "/usr/share/games/fortunes"]
job["model"].update(num_attention_heads=2, num_key_value_heads=1)
job["train"].update(steps=30, eval_interval=1000000, checkpoint_dir="", checkpoint_interval=0,
                    precision=sys.argv[3], collectives=sys.argv[4])
job["cluster"]["expected_workers"] = 1
json.dump(job, open(sys.argv[2], "w"), indent=1)
PY
  ctl="tcp://127.0.0.1:$(port)" st="tcp://127.0.0.1:$(port)" met="127.0.0.1:$(port)"
  "$build"/coordinator/semoe-coordinator --config "$out/job-$run.json" --bind "$ctl" \
      --status "$st" --metrics "$met" 2>"$out/coordinator-$run.log" &
  cpid=$!
  timeout 240 "$build"/worker/semoe-worker --coordinator "$ctl" --device "$dev" --id "w-$run" \
      --metrics-log "$out/train-$run.jsonl" 2>"$out/worker-$run.log"
  echo "== $run worker exited $?, ${SECONDS}s"
  wait $cpid
  grep -hE "communicator id|NCCL communicator" "$out/coordinator-$run.log" "$out/worker-$run.log" |
    sed 's/^/   /' | head -4
done
python3 - "$out" <<'PY'
import json, sys
def steps(p):
    try:
        return {l["step"]: l for l in map(json.loads, open(p))}
    except FileNotFoundError:
        return {}
out = sys.argv[1]
ref = steps(f"{out}/train-cpu-fp32.jsonl")
for a, b, bound in (("cuda-fp32", "cuda-fp32-nccl", 1e-6), ("cuda-bf16", "cuda-bf16-nccl", 1e-2)):
    same, nccl = steps(f"{out}/train-{a}.jsonl"), steps(f"{out}/train-{b}.jsonl")
    gap = max((abs(nccl[s]["loss"] - same[s]["loss"]) / abs(same[s]["loss"]) for s in same
               if s in nccl), default=float("inf"))
    ok = bool(same) and len(nccl) == len(same) and gap <= bound
    print(f"== {b} against {a} (zmq): {len(nccl)} of {len(same)} steps, worst relative loss "
          f"difference {gap:.3e} (bound {bound:g}): {'ok' if ok else 'FAIL'}")
for run, tol in (("cuda-fp32", 1e-5), ("cuda-fp32-nccl", 1e-5), ("cuda-bf16", 1e-2),
                 ("cuda-bf16-nccl", 1e-2)):
    got = steps(f"{out}/train-{run}.jsonl")
    worst = 0.0
    for s in sorted(ref):
        if s in got:
            d = abs(ref[s]["loss"] - got[s]["loss"]) / abs(ref[s]["loss"])
            worst = max(worst, d)
            print(f"{run} step {s:3d}  cpu {ref[s]['loss']:.7f}  {run} {got[s]['loss']:.7f}  "
                  f"rel {d:.2e}  step_s cpu {ref[s]['step_time_s']:.4f} {run} "
                  f"{got[s]['step_time_s']:.4f}")
    ok = len(got) == len(ref) and len(ref) > 0 and worst < tol
    print(f"== {run}: {len(got)} of {len(ref)} steps; worst relative loss difference "
          f"{worst:.3e} against the CPU's fp32 (bound {tol:g}): {'ok' if ok else 'FAIL'}")
PY
