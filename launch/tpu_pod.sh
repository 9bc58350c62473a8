#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install swd_jax on every worker, run on all workers.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--force-batch] [--config.x=y ...]
#   e.g. launch/tpu_pod.sh swd-v5p us-east5-a v5p-16 configs/sd35_medium.py gs://my-bucket/runs/sd35m \
#            --config.model.path=/mnt/ckpt/sd35m --config.data.path=/mnt/data/sd35m_pre
#
# Every worker runs the same command; on TPU VMs jax.distributed.initialize() finds the others by itself
# (swd_jax/train/distributed.py; SWD_DISTRIBUTED=1 forces it).
# Checkpoints go to WORKDIR (a gs:// path works with orbax); rerunning the script resumes from the latest.
# Before anything is created, launch/plan_check.py prints the TPU plan's batch recommendation for the slice
# (benchmarks/tpu_plan.json), refuses a per-chip batch the plan says does not fit unless --force-batch, and
# names a faster variant (--config.model.remat=False, remat_policy=attention|dots|dots_attention,
# attention_impl=splash_fused) when one fits with 10 % headroom.
# Env: TPU_VERSION (runtime image, default v2-alpha-tpuv5), REPO (git URL of this project), BRANCH (main).
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,14p "$0"; exit 2; fi
NAME=$1 ZONE=$2 ACCEL=$3 CONFIG=$4 WORKDIR=$5
shift 5
FORCE_BATCH="" OVERRIDES=""
for arg in "$@"; do
  if [ "$arg" = --force-batch ]; then FORCE_BATCH=$arg; else OVERRIDES="$OVERRIDES $arg"; fi
done
# shellcheck disable=SC2086
python3 "$(dirname "$0")/plan_check.py" "$ACCEL" "$CONFIG" $FORCE_BATCH $OVERRIDES
RUNTIME=${TPU_VERSION:-v2-alpha-tpuv5}
REPO=${REPO:?set REPO to the git URL of swd_jax}
BRANCH=${BRANCH:-main}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "creating $NAME ($ACCEL) in $ZONE"
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME"
else
  echo "reusing $NAME in $ZONE"
fi

SETUP="set -e; if [ ! -d swd_jax ]; then git clone -b $BRANCH $REPO swd_jax; fi; cd swd_jax && git pull -q; \
python3 -m venv ~/swd_venv && . ~/swd_venv/bin/activate && pip install -q -U pip && \
pip install -q -r launch/requirements-tpu.txt && pip install -q --no-deps -e ."
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$SETUP"

# TPU: the splash flash-attention kernel (swd_jax/models/splash.py); an override later on the line wins.
RUN="cd swd_jax && . ~/swd_venv/bin/activate && SWD_DISTRIBUTED=1 python -m swd_jax.train \
--config $CONFIG --workdir $WORKDIR --config.model.attention_impl=splash $OVERRIDES 2>&1 | tee -a ~/swd_train.log"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$RUN"
