"""SwD distillation of Stable Diffusion 3.5 Medium into a 4-step scale-wise student (reference run).

Reference hyperparameters (yandex-research/swd `train_sd35_medium.sh`): scales 64-80-96-128, boundaries
0-7-14-18-28, DMD + GAN + PDM, teacher CFG 7.0, features of block 11, LoRA rank 64 on attention and MLP
projections of both streams, AdamW lr 5e-6, 3000 steps, global batch 64 (8 GPUs x 8), bf16, remat.

1. Convert once:     python -m swd_jax.convert /path/to/stable-diffusion-3.5-medium /ckpt/sd35m --dtype bfloat16
2. Precompute data:  swd-precompute --model /path/to/stable-diffusion-3.5-medium \
                         --data /data/sd35_medium_train_data --out /data/sd35m_pre --scales 64,80,96,128
3. Train (one host):  python -m swd_jax.train --config configs/sd35_medium.py --workdir /runs/sd35m \
                         --config.model.path=/ckpt/sd35m --config.data.path=/data/sd35m_pre
   TPU pod slice:     launch/tpu_pod.sh NAME ZONE v5p-16 configs/sd35_medium.py gs://BUCKET/runs/sd35m \
                         --config.model.path=... --config.data.path=...
Cost (benchmarks/README.md §5, the TPU compiler's plan, 1024 px, splash attention): 30.4 GiB per v5p chip at
      8 images/chip with remat (the default), estimated MFU <= 0.44; --config.model.remat=False is faster
      (<= 0.54) but fits only at small per-chip batches. On v6e, 2 images/chip need 10.1 GiB of 32 (7 fit).
Result: the trained student LoRA in WORKDIR/student_peft (PEFT format; loads onto diffusers' transformer).
"""
import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "auto"  # a converted checkpoint (fastest to load) or the diffusers pipeline folder
    c.model.attention_impl = "chunked"  # 1024 px needs flash-like memory; launch/tpu_pod.sh picks "splash"
    c.schedule.preset = "sd35_medium_4"
    c.loss.cfg_teacher = 7.0
    c.loss.cls_blocks = (11,)
    c.loss.mmd_blocks = (11,)
    c.train.steps = 3000
    c.train.batch_size = 64
    c.data.kind = "precomputed"
    return c
