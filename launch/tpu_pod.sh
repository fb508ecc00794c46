#!/usr/bin/env bash
# Run a jaxcomp config on every worker of a Cloud TPU VM slice (multi-host), with gcloud.
#
#   launch/tpu_pod.sh check --config configs/smollm2_distill.py:w4_2of4 \
#       --config.mesh.shape.fsdp=16 --config.mesh.rules=fsdp   # dry run here, no TPU
#   launch/tpu_pod.sh create [<the same jaxcomp args>]  # the slice (TPU VM, runtime image),
#                                # once; with args, only after the dry run says the step fits
#   launch/tpu_pod.sh setup      # copy this checkout to every worker, pip install -e .
#   launch/tpu_pod.sh run --config configs/smollm2_distill.py:w4_2of4 \
#       --workdir /mnt/shared/runs/w4_2of4 --config.mesh.shape.fsdp=-1 --config.mesh.rules=fsdp
#   launch/tpu_pod.sh logs       # copy each worker's log here (./pod_logs/worker_<i>.log)
#   launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME (required), ZONE (required), PROJECT (default: gcloud's),
# ACCELERATOR (default v5litepod-16), RUNTIME (default v2-alpha-tpuv5-lite), SPOT=1 for a
# spot slice, REMOTE_DIR (default ~/jaxcomp), LOG_DIR (default ./pod_logs), TOPOLOGY (for
# check / create with args: the slice as jaxcomp.aot names it, e.g. v5p:4x4x4 for a v5p-128,
# v6e:16x16 for a v6e-256), PYTHON (default python3, for the local dry run).
#
# `check` compiles the config's training step for TOPOLOGY on this machine (python -m jaxcomp
# --compile_only: the real TPU compiler, the model's shapes, no data or weights; needs
# libtpu, pip install -e '.[aot]') and fails unless it fits in the chips' HBM; `create` with
# jaxcomp arguments runs it first, so a slice is never created for a step that cannot run.
#
# `run` starts `python -m jaxcomp --distributed "$@"` on all workers at once
# (`--worker=all`): jax.distributed.initialize() finds the coordinator and the process ids
# from the TPU metadata, every worker feeds only its rows of each batch, and orbax writes one
# checkpoint to the --workdir, which every worker must see (a gcsfuse-mounted bucket or a
# Filestore share at the same path). On
# preemption the TPU sends SIGTERM: every worker saves the step it finished and exits with
# status 75; `run` reruns the command while the status is 75 (RETRIES times, default 100),
# and each rerun resumes params, optimizer, step, rng and data position from the checkpoint.
set -euo pipefail

cmd=${1:-}
[[ -n $cmd ]] || { sed -n '2,31p' "$0"; exit 2; }
shift

dry_run() {  # compile the step for TOPOLOGY here; fails if it does not compile or fit
  : "${TOPOLOGY:?set TOPOLOGY (e.g. v5p:4x4x4) for the dry run}"
  local root workdir
  root=$(cd "$(dirname "$0")/.." && pwd)
  workdir=$(mktemp -d)
  (cd "$root" && JAX_PLATFORMS=cpu "${PYTHON:-python3}" -m jaxcomp --compile_only \
     --topology="$TOPOLOGY" --workdir="$workdir" "$@")
}

if [[ $cmd == check ]]; then
  [[ $# -gt 0 ]] || { echo "$0 check: give the jaxcomp arguments (--config ...)" >&2; exit 2; }
  dry_run "$@"
  exit
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-~/jaxcomp}
LOG_DIR=${LOG_DIR:-pod_logs}
RETRIES=${RETRIES:-100}
project=()
[[ -n ${PROJECT:-} ]] && project=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project[@]}")

ssh_all() {  # run a shell command on every worker
  "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case $cmd in
  create)
    [[ $# -eq 0 ]] || dry_run "$@"
    spot=()
    [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
    "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${spot[@]}"
    ;;
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxcomp.tgz .
    "${tpu[@]}" scp /tmp/jaxcomp.tgz "$TPU_NAME":/tmp/jaxcomp.tgz --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/jaxcomp.tgz -C $REMOTE_DIR && \
             cd $REMOTE_DIR && python3 -m pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    [[ $# -gt 0 ]] || { echo "$0 run: give the jaxcomp arguments (--config ... --workdir ...)" >&2; exit 2; }
    args=$(printf '%q ' "$@")
    ssh_all "cd $REMOTE_DIR && for i in \$(seq $RETRIES); do \
               python3 -m jaxcomp --distributed $args >>run.log 2>&1 && exit 0; \
               s=\$?; [ \$s -eq 75 ] || exit \$s; echo 'preempted: resuming' >>run.log; \
             done"
    ;;
  logs)
    mkdir -p "$LOG_DIR"
    n=$("${tpu[@]}" describe "$TPU_NAME" --zone="$ZONE" --format='value(networkEndpoints.len())')
    for ((i = 0; i < n; i++)); do
      "${tpu[@]}" scp "$TPU_NAME:$REMOTE_DIR/run.log" "$LOG_DIR/worker_$i.log" --zone="$ZONE" \
        --worker="$i"
    done
    ;;
  delete)
    "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    echo "$0: unknown command '$cmd' (check, create, setup, run, logs, delete)" >&2
    exit 2
    ;;
esac
