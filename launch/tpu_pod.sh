#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install swd_jax on every worker, train on all workers,
# and relaunch after preemptions and failures.
#
#   launch/tpu_pod.sh [OPTIONS] NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#   e.g. REPO=https://github.com/me/swd_jax launch/tpu_pod.sh --spot --mount gs://my-data \
#            swd-v5p us-east5-a v5p-16 configs/sd35_medium.py gs://my-runs/sd35m \
#            --config.model.path=/mnt/gcs/my-data/sd35m --config.data.path=/mnt/gcs/my-data/sd35m_pre
#
# Options (anywhere on the line; arguments starting with --config. go to the trainer):
#   --spot            a spot slice (cheaper; preemptible)
#   --queued          ask for the slice through a queued resource (QR_ID, default NAME) and wait until ACTIVE
#   --mount gs://B    mount bucket B read-only at /mnt/gcs/B on every worker (gcsfuse --implicit-dirs;
#                     repeatable). The trainer cannot read array_record data from gs://: give data.path as
#                     /mnt/gcs/B/...
#   --max-restarts N  reruns after failures that are not preemptions (default 3)
#   --dry-run         print every gcloud command, run none (the local plan check still runs)
#   --force-batch     launch although benchmarks/tpu_plan.json says the batch does not fit (launch/plan_check.py)
# ACCELERATOR: v5p-N, v6e-N, v5litepod-N (v5e) or v4-N; the runtime image follows the generation
# (v2-alpha-tpuv5, v2-alpha-tpuv6e, v2-alpha-tpuv5-lite, tpu-ubuntu2204-base) unless TPU_VERSION is set.
# WORKDIR: gs://... (needed on a multi-host slice) or a path on the workers. The trainer writes checkpoints,
# config, metrics, samples and the adapter there; each worker's log goes to WORKDIR/logs/worker-ID.log.
# When training ends: exit 0 -> done; 2 -> a user error, stop; 75 (preempted, checkpoint saved) or a slice that
# is PREEMPTED, SUSPENDED or gone -> recreate the slice if needed, reinstall, rerun (it resumes from the
# checkpoint); any other exit -> rerun, at most --max-restarts times. Each rerun prints one line saying why.
# Env: REPO (git URL of this project; required), BRANCH (main), TPU_VERSION, QR_ID (NAME), SWD_POLL_S (30:
# seconds between slice polls and before reruns), SWD_LOG_SYNC_S (60), SWD_SKIP_PLAN_CHECK=1. launch/README.md.
set -euo pipefail
exec 3>&1  # the '+ gcloud ...' lines go to fd 3 (stdout), also from inside $(...)
HERE=$(cd "$(dirname "$0")" && pwd)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
die() { echo "tpu_pod: $*" >&2; exit 2; }

SPOT="" QUEUED="" DRY_RUN="" FORCE_BATCH="" MAX_RESTARTS=3
MOUNTS=() OVERRIDES=() POSITIONAL=()
while [ $# -gt 0 ]; do
  case $1 in
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --force-batch) FORCE_BATCH=--force-batch ;;
    --mount) [ $# -ge 2 ] || usage; MOUNTS+=("$2"); shift ;;
    --mount=*) MOUNTS+=("${1#*=}") ;;
    --max-restarts) [ $# -ge 2 ] || usage; MAX_RESTARTS=$2; shift ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=} ;;
    --config.*) OVERRIDES+=("$1") ;;
    -h | --help) usage 0 ;;
    -*) echo "tpu_pod: unknown option $1" >&2; usage ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
[ ${#POSITIONAL[@]} -eq 5 ] || usage
NAME=${POSITIONAL[0]} ZONE=${POSITIONAL[1]} ACCEL=${POSITIONAL[2]} CONFIG=${POSITIONAL[3]} WORKDIR=${POSITIONAL[4]}

[[ $ACCEL =~ ^(v5p|v6e|v5litepod|v4)-[0-9]+$ ]] ||
  die "unknown accelerator $ACCEL (known: v5p-N, v6e-N, v5litepod-N, v4-N)"
case $ACCEL in
  v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
  v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
  v4-*) RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${TPU_VERSION:-$RUNTIME}
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts takes a number, not $MAX_RESTARTS"
for m in ${MOUNTS[@]+"${MOUNTS[@]}"}; do
  [[ $m =~ ^gs://[a-z0-9][-a-z0-9_.]*$ ]] || die "--mount takes a bucket, gs://BUCKET (no path): $m"
done
REPO=${REPO:-} BRANCH=${BRANCH:-main} QR_ID=${QR_ID:-$NAME}
[ -n "$REPO" ] || die "set REPO to the git URL of swd_jax (cloned on every worker)"
[ -n "$DRY_RUN" ] || command -v gcloud >/dev/null || die "gcloud is not on PATH (install the Google Cloud CLI)"
POLL=${SWD_POLL_S:-30} LOG_SYNC=${SWD_LOG_SYNC_S:-60}
if [ -n "$QUEUED" ]; then SLICE="queued resource $QR_ID"; else SLICE="TPU VM $NAME"; fi
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT

if [ -z "${SWD_SKIP_PLAN_CHECK:-}" ]; then
  python3 "$HERE/plan_check.py" "$ACCEL" "$CONFIG" $FORCE_BATCH ${OVERRIDES[@]+"${OVERRIDES[@]}"}
fi

show() {  # print a gcloud command as one line a shell can rerun
  local line="+ gcloud" a
  # shellcheck disable=SC2001  # sed, not ${a//...}: bash 3.2 (macOS's) mangles quotes there
  for a in "$@"; do
    if [[ $a =~ ^[-A-Za-z0-9_./:=@,+]+$ ]]; then line+=" $a"; else line+=" '$(sed "s/'/'\\\\''/g" <<<"$a")'"; fi
  done
  echo "$line" >&3
}
gc() { show "$@"; [ -n "$DRY_RUN" ] || gcloud "$@"; }  # every gcloud call that changes something
remote() { printf ' %q' "$@"; }                       # arguments quoted for the worker's shell

slice_state() {  # gcloud's state of the slice (READY/ACTIVE when usable), "" when it does not exist
  local describe
  if [ -n "$QUEUED" ]; then
    describe=(compute tpus queued-resources describe "$QR_ID" --zone "$ZONE" --format='value(state.state)')
  else
    describe=(compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --format='value(state)')
  fi
  if [ -n "$DRY_RUN" ]; then show "${describe[@]}"; return 0; fi
  if gcloud "${describe[@]}" 2>"$ERR"; then return 0; fi
  if grep -qi "not.found" "$ERR"; then return 0; fi
  cat "$ERR" >&2
  echo UNKNOWN
}

create_slice() {
  INSTALL=1
  if [ -n "$QUEUED" ]; then
    gc compute tpus queued-resources create "$QR_ID" --node-id "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
      --runtime-version "$RUNTIME" ${SPOT:+--spot}
  else
    gc compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME" \
      ${SPOT:+--spot}
  fi
}

delete_slice() {
  if [ -n "$QUEUED" ]; then
    gc compute tpus queued-resources delete "$QR_ID" --zone "$ZONE" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
  fi
}

RESTARTS=0
fail() {  # a failure that is no preemption: rerun after SWD_POLL_S, or stop once --max-restarts are used
  RESTARTS=$((RESTARTS + 1))
  if [ "$RESTARTS" -gt "$MAX_RESTARTS" ]; then
    echo "tpu_pod: $1; stopping after $MAX_RESTARTS restarts"
    exit "$2"
  fi
  echo "tpu_pod: restart $RESTARTS/$MAX_RESTARTS: $1"
  sleep "$POLL"
}

ensure_slice() {  # until READY/ACTIVE: create it when absent, delete it when dead, else wait
  local state last=none
  while :; do
    state=$(slice_state)
    case $state in
      READY | ACTIVE) return 0 ;;
      "")
        echo "tpu_pod: creating $SLICE ($ACCEL${SPOT:+, spot}, runtime $RUNTIME) in $ZONE"
        create_slice || return 1
        [ -z "$DRY_RUN" ] || return 0 ;;
      PREEMPTED | TERMINATED | SUSPENDED | FAILED)
        [ "$state" != FAILED ] || fail "$SLICE is FAILED" 1
        echo "tpu_pod: $SLICE is $state: deleting it to create it again"
        delete_slice || return 1 ;;
      STOPPED) die "$SLICE is STOPPED: start it (gcloud compute tpus tpu-vm start) or delete it" ;;
      *)
        [ "$state" = "$last" ] || echo "tpu_pod: $SLICE is $state: waiting (polling every ${POLL}s)"
        sleep "$POLL" ;;
    esac
    last=$state
  done
}

setup_workers() {  # the worker script, the install and the bucket mounts, on every worker
  gc compute tpus tpu-vm scp "$HERE/tpu_worker.sh" "$NAME:tpu_worker.sh" --zone "$ZONE" --worker=all &&
    gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all \
      --command "bash tpu_worker.sh setup$(remote "$REPO" "$BRANCH" ${MOUNTS[@]+"${MOUNTS[@]}"})"
}

train_workers() {  # gcloud waits for every worker and exits with the first failing worker's code (255: ssh)
  # TPU: the splash flash-attention kernel (swd_jax/models/splash.py); an override later on the line wins.
  local args
  args=$(remote "$WORKDIR" "$CONFIG" --config.model.attention_impl=splash ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all \
    --command "SWD_LOG_SYNC_S=$LOG_SYNC bash tpu_worker.sh train$args"
}

INSTALL=1  # install on the workers: at the start (a reused slice may hold an older checkout) and after creating
while :; do
  ensure_slice || { fail "creating $SLICE failed" 1; continue; }
  if [ -n "$INSTALL" ]; then
    setup_workers || { fail "the setup of the workers failed" 1; continue; }
    INSTALL=""
  fi
  rc=0
  train_workers || rc=$?
  [ -z "$DRY_RUN" ] || exit 0
  case $rc in
    0) echo "tpu_pod: training finished"; exit 0 ;;
    2) echo "tpu_pod: the trainer exited 2, a user error (its message is above): not rerunning"; exit 2 ;;
  esac
  state=$(slice_state)
  case $state in
    READY | ACTIVE) ;;
    *)  # after a reboot or a recreation the install or the mounts may be gone: set up again
      echo "tpu_pod: rerun: the trainer exited $rc and $SLICE is ${state:-gone}: bringing it back"
      INSTALL=1
      continue ;;
  esac
  if [ "$rc" = 75 ]; then
    echo "tpu_pod: rerun: the trainer was preempted (exit 75) and saved a checkpoint; resuming on $SLICE"
    continue
  fi
  fail "the trainer exited $rc on a healthy $SLICE" "$rc"
done
