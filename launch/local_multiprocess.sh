#!/usr/bin/env bash
# Train as N processes on this machine (CPU devices, or GPUs split between processes): the multi-host code path
# of a TPU slice, runnable anywhere. Each process feeds its own share of every global batch; process 0 writes
# metrics; all write one orbax checkpoint together. A failing process tells the others, which stop within a
# second naming it; a killed one is noticed by process 0 after SWD_PEER_TIMEOUT_S (default 15 s), and if process 0
# dies the others stop at once. Each prints one error: line; jax's C++ stacks go to
# $SWD_NATIVE_LOG_DIR/swd_native_process<i>.log (default: the temp folder). SIGTERM/Ctrl-C: every process saves
# one agreed step and exits 75. Rerunning the script resumes every process from the latest complete checkpoint.
#
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/local_multiprocess.sh 2 4 tiny /tmp/swd_2proc --config.mesh.shape=2,4,1
#
# The layout goes through the documented variables SWD_COORDINATOR (host:port of process 0),
# SWD_NUM_PROCESSES and SWD_PROCESS_ID (swd_jax/train/distributed.py); the trainer's --coordinator,
# --num_processes and --process_id flags do the same. On a GPU cluster run one process per node with those
# variables set (or the flags); on TPU VMs nothing is needed (launch/tpu_pod.sh).
# Env: PORT (coordinator port, default 12355), PYTHON (default python), JAX_PLATFORMS (default cpu).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n 2,15p "$0"; exit 2; fi
N=$1 DEVICES=$2 CONFIG=$3 WORKDIR=$4
shift 4
cd "$(dirname "$0")/.."
export SWD_COORDINATOR="localhost:${PORT:-12355}" SWD_NUM_PROCESSES=$N
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  SWD_PROCESS_ID=$i "${PYTHON:-python}" -m swd_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > >(sed "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
