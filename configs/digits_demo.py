"""The built-in demo: SwD on scikit-learn's handwritten digits, end to end on CPU (swd_jax/demo/).

    python -m swd_jax.demo --workdir /tmp/swd_demo

Sizes: 16 x 16 x 1 "latents" (the digits, upsampled; identity VAE), patch 2 -> 64 image tokens + 6 text tokens,
a 3-block MMDiT of width 64 (2 heads of 32, dual attention in blocks 0-1, RMS qk-norm, as SD3.5-M), 0.49 M
parameters, trained by flow matching on steps cycling through the latent sizes 8 10 12 16 16. SwD schedule
8 -> 10 -> 12 -> 16 on the boundaries 0 7 14 18 28 of the shift-3 28-step grid (the SD3.5-M 4-step table scaled
from 128 to 16); the full-resolution baseline 16 16 16 16 on the same boundaries, same steps, batch and rates.
Cost: 13.4 min wall (751 s user) on a shared 2-core CPU, ~3 GB RAM. Result: SwD student 97.6 % prompt accuracy
(teacher, 28 steps: 98.8 %) at 0.55x the FLOPs of the full-resolution 4-step student (96.6 %); the table, grids
and findings are in docs/demo_results.md.
"""
import ml_collections

import swd_jax.demo.digits_source  # noqa: F401  (registers data.kind="digits" with the trainer)
from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "converted"  # the demo points model.path at <workdir>/teacher
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = False
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.schedule.preset = ""
    c.schedule.scales = (8, 10, 12, 16)
    c.schedule.boundaries = (0, 7, 14, 18, 28)
    c.loss.n_fake_steps = 2
    c.loss.cfg_teacher = 2.0
    c.loss.cls_blocks = (1,)
    c.loss.mmd_blocks = (1,)
    c.optim.lr = 2e-4
    c.optim.lr_fake = 2e-4
    c.data.kind = "digits"  # the demo points data.path at <workdir>/distill_data.npz
    c.train.steps = 120
    c.train.batch_size = 32
    c.train.log_every = 5
    c.train.ckpt_every = 40
    c.train.keep = 1
    c.train.sample_every = 0
    c.train.export_peft = False
    c.mesh.shape = (1, 1, 1)

    c.demo = ml_collections.ConfigDict()
    # The teacher: SD3Transformer2DModel fields (written to <workdir>/teacher/config.json).
    c.demo.teacher = dict(sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=3,
                          attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                          caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8,
                          dual_attention_layers=(0, 1), qk_norm="rms_norm")
    # Its flow-matching pretraining (swd_jax.demo.teacher.TeacherTraining fields).
    # Multi-resolution: the steps cycle through the latent sizes 8 10 12 16 16, so the teacher denoises well at
    # every size of the SwD schedule (SD3.5 is trained at many sizes; a 16-only teacher breaks SwD, see docs).
    c.demo.pretrain = dict(steps=800, batch_size=32, lr=3e-3, warmup=50, weight_decay=0.0, clip_norm=1.0,
                           ema_decay=0.999, p_uncond=0.1, sigma_sampling="logit_normal", shift=1.0, seed=0,
                           ckpt_every=100, scales=(8, 10, 12, 16, 16))
    # Distillation data: teacher Euler samples on the 28-step shift-3 grid with CFG.
    c.demo.data = dict(num_images=500, steps=28, guidance=2.0, seed=1)
    c.demo.baseline_scales = (16, 16, 16, 16)
    c.demo.sample_batch = 100  # every sampler call (data, evaluation) uses this batch: one compile per program
    c.demo.eval = dict(num_images=500, seed=2, grid_rows=4, classifier_hidden=64)
    return c
