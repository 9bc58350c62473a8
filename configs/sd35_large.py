"""SwD distillation of Stable Diffusion 3.5 Large into a 4-step scale-wise student (reference run).

Reference (`train_sd35_large.sh`): scales 64-80-96-128, boundaries 0-7-14-18-28, teacher CFG 4.5, features of
block 20 (of 38), LoRA rank 64, lr 5e-6, 4000 steps, global batch 32 (8 GPUs x 4), bf16, remat.

    python -m swd_jax.convert /path/to/stable-diffusion-3.5-large /ckpt/sd35l --dtype bfloat16
    swd-precompute --model /path/to/stable-diffusion-3.5-large \
        --data /data/sd35_large_train_data --out /data/sd35l_pre --scales 64,80,96,128
    launch/tpu_pod.sh NAME ZONE v5p-32 configs/sd35_large.py gs://BUCKET/runs/sd35l \
        --config.model.path=/ckpt/sd35l --config.data.path=/data/sd35l_pre
Cost (benchmarks/README.md §5, the TPU compiler's plan): 36.1 GiB per v5p chip at 4 images/chip with remat,
estimated MFU <= 0.48; up to 21 images/chip fit with 10 % headroom.
"""
import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "auto"  # a converted checkpoint (fastest to load) or the diffusers pipeline folder
    c.model.attention_impl = "chunked"  # 1024 px needs flash-like memory; launch/tpu_pod.sh picks "splash"
    c.schedule.preset = "sd35_large_4"
    c.loss.cfg_teacher = 4.5
    c.loss.cls_blocks = (20,)
    c.loss.mmd_blocks = (20,)
    c.train.steps = 4000
    c.train.batch_size = 32
    c.data.kind = "precomputed"
    return c
