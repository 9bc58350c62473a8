#!/usr/bin/env bash
# The worker half of launch/tpu_pod.sh: copied to ~/tpu_worker.sh on every TPU VM worker and run there through
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command "bash tpu_worker.sh ..."`.
#
#   bash tpu_worker.sh setup REPO BRANCH [gs://BUCKET ...]
#       mount each bucket read-only at /mnt/gcs/BUCKET (installs gcsfuse if missing), then clone or update
#       REPO at BRANCH in ~/swd_jax, with a venv ~/swd_venv holding launch/requirements-tpu.txt and swd_jax
#   bash tpu_worker.sh train WORKDIR CONFIG [--config.x=y ...]
#       start `python -m swd_jax.train` detached (a dropped ssh connection does not kill it), print its log as it
#       grows, exit with its exit code. If a trainer started by an earlier `train` still runs: the same arguments
#       attach to it; other arguments stop it first (SIGTERM: it saves a checkpoint).
#
# Worker id: SWD_WORKER_ID, else the VM metadata attribute agent-worker-number (0 .. workers-1), else hostname.
# Log of worker ID: WORKDIR/logs/worker-ID.log, appended, one header line per run. A local WORKDIR gets it
# written directly; a gs:// WORKDIR gets a copy of ~/swd_run/worker-ID.log (`gcloud storage cp`) every
# SWD_LOG_SYNC_S (60) seconds and when the trainer exits.
set -euo pipefail
RUN_DIR=$HOME/swd_run  # pid, trainer_pid, args and exit_code of the current run; the log for a gs:// WORKDIR
SYNC=${SWD_LOG_SYNC_S:-60}

install_gcsfuse() {  # Google's apt repository, as the gcsfuse install docs and MaxText's setup do
  local codename
  local key=/usr/share/keyrings/cloud.google.asc
  codename=$(lsb_release -c -s)
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$key" >/dev/null
  echo "deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
}

mount_bucket() {  # read-only with implicit directories, as MaxText's setup_gcsfuse.sh mounts datasets
  local bucket=$1 dir=/mnt/gcs/$1
  if mountpoint -q "$dir"; then echo "worker: $dir is mounted already"; return 0; fi
  sudo mkdir -p "$dir"
  sudo chown "$(id -u):$(id -g)" "$dir"
  gcsfuse -o ro --implicit-dirs "$bucket" "$dir"
  echo "worker: gs://$bucket mounted at $dir"
}

setup() {
  local repo=$1 branch=$2 bucket
  shift 2
  if [ $# -gt 0 ] && ! command -v gcsfuse >/dev/null; then install_gcsfuse; fi
  for bucket in "$@"; do mount_bucket "${bucket#gs://}"; done
  [ -d ~/swd_jax ] || git clone -q -b "$branch" "$repo" ~/swd_jax
  cd ~/swd_jax
  git fetch -q origin "$branch" && git checkout -q "$branch" && git merge -q --ff-only FETCH_HEAD
  [ -d ~/swd_venv ] || python3 -m venv ~/swd_venv
  # shellcheck source=/dev/null
  . ~/swd_venv/bin/activate
  pip install -q -U pip
  pip install -q -r launch/requirements-tpu.txt
  pip install -q --no-deps -e .
}

worker_id() {
  [ -z "${SWD_WORKER_ID:-}" ] || { echo "$SWD_WORKER_ID"; return; }
  curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname
}

absolute() {  # a local WORKDIR is relative to ~/swd_jax, where the trainer runs
  case $1 in gs://* | /*) echo "$1" ;; *) echo "$HOME/swd_jax/$1" ;; esac
}

log_of() {  # log_of WORKDIR ID: the file the trainer's output is appended to
  case $1 in gs://*) echo "$RUN_DIR/worker-$2.log" ;; *) echo "$1/logs/worker-$2.log" ;; esac
}

copy_log() {  # a gs:// WORKDIR gets a copy of the local log
  case $1 in gs://*) gcloud storage cp -q "$2" "$1/logs/worker-$3.log" || echo "worker: could not copy the log" ;; esac
}

running() {  # pid of the detached `run` from an earlier `train`, when it still runs
  local pid
  pid=$(cat "$RUN_DIR/pid" 2>/dev/null) || return 1
  grep -qs tpu_worker "/proc/$pid/cmdline" && echo "$pid"
}

train() {
  local workdir id log args pid from
  workdir=$(absolute "$1")
  shift
  id=$(worker_id)
  log=$(log_of "$workdir" "$id")
  mkdir -p "$RUN_DIR" "$(dirname "$log")"
  args=$(printf '%q ' "$workdir" "$@")
  if pid=$(running); then
    if [ "$(cat "$RUN_DIR/args")" = "$args" ]; then
      echo "worker $id: attaching to the trainer that is running with these arguments (pid $pid)"
    else
      echo "worker $id: stopping the trainer that runs with other arguments (SIGTERM; it saves a checkpoint)"
      kill -TERM "$(cat "$RUN_DIR/trainer_pid")" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 1; done
      pid=""
    fi
  fi
  from=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))
  if [ -z "$pid" ]; then
    rm -f "$RUN_DIR/exit_code" "$RUN_DIR/trainer_pid"
    echo "$args" >"$RUN_DIR/args"
    nohup bash "$0" run "$id" "$workdir" "$@" >/dev/null 2>&1 &
    pid=$!
    echo "$pid" >"$RUN_DIR/pid"
  fi
  tail -c "+$from" -F -s 0.2 --pid="$pid" "$log" 2>/dev/null || true
  [ -f "$RUN_DIR/exit_code" ] || { echo "worker $id: the trainer left no exit code"; exit 1; }
  exit "$(cat "$RUN_DIR/exit_code")"
}

run() {  # the detached trainer: its log, the log's copies, its exit code
  local id=$1 workdir=$2 config=$3 log child syncer="" rc=0
  shift 3
  log=$(log_of "$workdir" "$id")
  echo "==== worker $id, $(date -u +%FT%TZ): python -m swd_jax.train --config $config --workdir $workdir $*" >>"$log"
  case $workdir in
    gs://*) (while sleep "$SYNC"; do copy_log "$workdir" "$log" "$id"; done) & syncer=$! ;;
  esac
  trap ':' TERM INT HUP  # outlive a SIGTERM to every process (a preemption) to record the trainer's exit code
  # shellcheck source=/dev/null
  (cd ~/swd_jax && . ~/swd_venv/bin/activate &&
    SWD_DISTRIBUTED=1 exec python -m swd_jax.train --config "$config" --workdir "$workdir" "$@") >>"$log" 2>&1 &
  child=$!
  echo "$child" >"$RUN_DIR/trainer_pid"
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupted the wait: the trainer still runs
    rc=0
    wait "$child" || rc=$?
  done
  [ -z "$syncer" ] || kill "$syncer" 2>/dev/null || true
  echo "==== worker $id: the trainer exited $rc ====" >>"$log"
  copy_log "$workdir" "$log" "$id"
  echo "$rc" >"$RUN_DIR/exit_code"
}

[ $# -ge 1 ] || { sed -n 4,11p "$0"; exit 2; }
mode=$1
shift
case $mode in
  setup) [ $# -ge 2 ] || { sed -n 4,11p "$0"; exit 2; }; setup "$@" ;;
  train) [ $# -ge 2 ] || { sed -n 4,11p "$0"; exit 2; }; train "$@" ;;
  run) run "$@" ;;
  *) sed -n 4,11p "$0"; exit 2 ;;
esac
