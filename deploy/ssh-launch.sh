#!/bin/sh
# Starts a coordinator here and workers on other hosts over ssh (semoe installed on each).
#   deploy/ssh-launch.sh JOB.json ADDR HOST:DEVICE [HOST:DEVICE ...]
#     ADDR          this host's address as the workers reach it (the control socket binds to it)
#     HOST:DEVICE   e.g. gpu1:cuda:0 gpu1:cuda:1 gpu2:cpu
# Stops everything on Ctrl-C or when the coordinator exits (`semoe stop` ends the job).
set -eu
[ $# -ge 3 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
job=$1 addr=$2; shift 2
[ -r "$job" ] || { echo "ssh-launch: cannot read $job" >&2; exit 2; }
control="tcp://$addr:5555"
semoe-coordinator --config "$job" --bind "$control" &
coord=$!
pids=""
for spec in "$@"; do
  host=${spec%%:*} dev=${spec#*:}
  [ "$host" != "$spec" ] || { echo "ssh-launch: $spec: want HOST:DEVICE" >&2; kill $coord; exit 2; }
  # -tt: the remote worker dies with the ssh session, so nothing outlives the launcher.
  ssh -tt "$host" semoe-worker --coordinator "$control" --device "$dev" --id "$host-$dev" \
      --advertise "$host" --data-bind 'tcp://*:*' &
  pids="$pids $!"
done
trap 'kill $pids $coord 2>/dev/null; wait' INT TERM
wait $coord || true
kill $pids 2>/dev/null || true
wait
