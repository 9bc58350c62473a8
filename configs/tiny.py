"""Tiny random-weight SwD run on CPU in seconds: the smoke test of the whole training path.

    python -m swd_jax.train --config configs/tiny.py --workdir /tmp/swd_tiny

Cost: ~a few seconds per iteration (5 fake + 1 generator update) on a 2-core CPU after compiling one program
per scale interval. The teacher is random, so only the losses' behaviour is meaningful, not the images.
"""
import ml_collections

import swd_jax.demo.digits_source  # noqa: F401  (registers data.kind="digits" with the trainer)
from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "random"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = False
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.head.num_layers = 4
    c.schedule.preset = ""
    c.schedule.scales = (8, 12, 16)
    c.schedule.boundaries = (0, 7, 14, 28)
    c.loss.cls_blocks = (1,)
    c.loss.mmd_blocks = (1,)
    c.loss.cfg_teacher = 4.5
    c.optim.lr = 1e-3
    c.optim.lr_fake = 1e-3
    c.data.kind = "digits"
    c.train.steps = 30
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.sample_every = 0
    c.train.num_samples = 4
    c.mesh.shape = (1, 1, 1)
    return c
