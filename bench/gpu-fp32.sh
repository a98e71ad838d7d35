#!/bin/bash
# One device call for the CUDA backend's fp32 step: build with CUDA, run the gpu suite (each op
# and the whole model against the CPU backend), then train the demo model for 30 steps with one
# worker on the CPU and one on cuda:0 and compare their losses step by step. From the repo
# root, after ../shared/device/prepare.sh fortunes-min fortunes (the demo job's data):
#   source .device/on-device.sh && bash bench/gpu-fp32.sh
# Everything it prints goes to $OUT/gpu-fp32.log too.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-fp32.log") 2>&1
echo "== semoe bench/gpu-fp32.sh  commit ${SEMOE_COMMIT:-?}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
meson setup build-gpu -Dcuda=enabled --buildtype=debugoptimized >"$out/setup.log" 2>&1 ||
  { tail -30 "$out/setup.log"; exit 1; }
ninja -C build-gpu >"$out/build.log" 2>&1 || { grep -A5 -E "error|FAILED" "$out/build.log" | head -60; exit 1; }
echo "== build: $(grep -c '' "$out/build.log") lines of ninja output, ${SECONDS}s"
meson test -C build-gpu --suite gpu --print-errorlogs --num-processes 1 ||
  echo "== meson test --suite gpu failed"
cp build-gpu/meson-logs/testlog.txt "$out/gpu-testlog.txt" 2>/dev/null

# Training: the demo model, 30 steps, one worker on each backend, same job and seed.
sys=${SEMOE_DEVICE_SYS:-/tmp/device-sys}
python3 - "$sys" "$out/job.json" <<'PY'
import json, sys
job = json.load(open("deploy/jobs/demo.json"))
job["data"]["paths"] = [sys.argv[1] + "/usr/share/games/fortunes"]
job["train"].update(steps=30, eval_interval=1000000, checkpoint_dir="", checkpoint_interval=0)
job["cluster"]["expected_workers"] = 1
json.dump(job, open(sys.argv[2], "w"), indent=1)
PY
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for dev in cpu cuda:0; do
  tag=${dev%%:*}
  ctl="tcp://127.0.0.1:$(port)" st="tcp://127.0.0.1:$(port)" met="127.0.0.1:$(port)"
  build-gpu/coordinator/semoe-coordinator --config "$out/job.json" --bind "$ctl" --status "$st" \
      --metrics "$met" 2>"$out/coordinator-$tag.log" &
  cpid=$!
  timeout 240 build-gpu/worker/semoe-worker --coordinator "$ctl" --device "$dev" --id "w-$tag" \
      --metrics-log "$out/train-$tag.jsonl" 2>"$out/worker-$tag.log"
  echo "== $dev worker exited $?, ${SECONDS}s"
  wait $cpid
done
python3 - "$out/train-cpu.jsonl" "$out/train-cuda.jsonl" <<'PY'
import json, sys
def losses(p):
    try:
        return {l["step"]: l for l in map(json.loads, open(p))}
    except FileNotFoundError:
        return {}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = 0.0
for s in sorted(a):
    if s in b:
        d = abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"])
        worst = max(worst, d)
        print(f"step {s:3d}  cpu {a[s]['loss']:.7f}  cuda {b[s]['loss']:.7f}  rel {d:.2e}  "
              f"step_s cpu {a[s]['step_time_s']:.4f} cuda {b[s]['step_time_s']:.4f}")
print(f"== {len(a)} cpu steps, {len(b)} cuda steps; worst relative loss difference {worst:.3e}")
PY
