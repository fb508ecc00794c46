#!/usr/bin/env bash
# N jaxcomp processes on this machine, each with D simulated CPU devices, talking over gloo:
# a multi-host run in miniature (the same code path as a TPU pod slice).
#
#   launch/local_multiprocess.sh N D --config configs/smollm2_distill.py:w4_2of4,tiny \
#       --workdir runs/mp [--config.x=y ...]
#
# Process i runs `python -m jaxcomp --coordinator_address=localhost:$PORT --num_processes=N
# --process_id=i "$@"` with JAX_PLATFORMS=cpu and
# XLA_FLAGS="--xla_force_host_platform_device_count=D $EXTRA_XLA_FLAGS"; its output goes to
# $LOG_DIR/process_<i>.log (LOG_DIR defaults to ./mp_logs). PORT defaults to a free port.
# Exits with the first non-zero status of the processes (all are stopped then), else 0.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 N_PROCESSES DEVICES_PER_PROCESS <jaxcomp args...>" >&2
  exit 2
fi
N=$1; D=$2; shift 2
[[ $N =~ ^[1-9][0-9]*$ && $D =~ ^[1-9][0-9]*$ ]] || {
  echo "$0: N_PROCESSES and DEVICES_PER_PROCESS must be positive integers, got '$N' '$D'" >&2
  exit 2
}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-mp_logs}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
mkdir -p "$LOG_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D ${EXTRA_XLA_FLAGS:-}" \
    "$PYTHON" -m jaxcomp --coordinator_address="localhost:$PORT" --num_processes="$N" \
    --process_id="$i" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for p in "${pids[@]}"; do
  rc=0
  wait "$p" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; cleanup; fi
done
if [[ $status -ne 0 ]]; then
  echo "$0: a process failed (status $status); logs in $LOG_DIR" >&2
fi
exit $status
