#!/bin/bash
# One device call: build with CUDA on the GPU machine, run the test suites there, and join a
# worker on each GPU to a coordinator so that status shows the devices. Run through the device
# tool from the repo root, after ../shared/device/prepare.sh here:
#   source .device/on-device.sh && bash bench/gpu.sh
# Everything it prints also goes to $OUT/gpu.log; status JSON to $OUT/status.json.
set -uo pipefail
out=${OUT:-/tmp/semoe-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
echo "== semoe bench/gpu.sh  commit ${SEMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export NCCL_NVLS_ENABLE=0
meson setup build-gpu -Dcuda=enabled >"$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
grep -A8 '^semoe' build-gpu/meson-logs/meson-log.txt | tail -8
ninja -C build-gpu || exit 1
meson test -C build-gpu --suite unit --suite proto --suite net --suite fault --suite gpu \
    --print-errorlogs || echo "== meson test failed"

# Every GPU joins as a worker; the status socket must show each with its name and HBM.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctl="tcp://127.0.0.1:$(port)" st="tcp://127.0.0.1:$(port)" met="127.0.0.1:$(port)"
build-gpu/coordinator/semoe-coordinator --config deploy/jobs/demo.json --bind "$ctl" \
    --status "$st" --metrics "$met" 2>"$out/coordinator.log" &
pids=$!
n=$(nvidia-smi -L | wc -l)
for ((i = 0; i < n; i++)); do
  build-gpu/worker/semoe-worker --coordinator "$ctl" --device "cuda:$i" --id "gpu$i" \
      2>"$out/worker$i.log" &
  pids="$pids $!"
done
for _ in $(seq 100); do
  build-gpu/cli/semoe status --endpoint "$st" --json >"$out/status.json" 2>/dev/null &&
    grep -q '"state":[[:space:]]*"running"' "$out/status.json" && break
  sleep 0.1
done
build-gpu/cli/semoe status --endpoint "$st"
build-gpu/cli/semoe stop --endpoint "$ctl"
# Wait for the daemons only: a bare `wait` would also wait for the tee above.
wait $pids
echo "== done"
