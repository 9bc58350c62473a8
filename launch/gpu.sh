#!/usr/bin/env bash
# Train on one host with GPUs (all local GPUs in one mesh: FSDP over them, batch split over them).
#
#   launch/gpu.sh CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/gpu.sh configs/sd35_medium.py /runs/sd35m --config.model.path=/ckpt/sd35m \
#            --config.data.path=/data/sd35m_pre --config.model.attention_impl=cudnn
#
# Installs into .venv-gpu on first use (jax[cuda12]); rerunning resumes from WORKDIR's latest checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,8p "$0"; exit 2; fi
CONFIG=$1 WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
if [ ! -d .venv-gpu ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -U pip
  .venv-gpu/bin/pip install -q -r requirements.txt "jax[cuda12]==0.10.2"
  .venv-gpu/bin/pip install -q --no-deps -e .
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec .venv-gpu/bin/python -m swd_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
