"""The tiny SD3.5-Medium-shaped setup of the CPU benchmarks, as our run config and as a diffusers config.

SD3.5-Medium's structure at a CPU size: dual attention (MMDiT-X) in the first layers, RMS qk-norm, 16 latent
channels, patch 2, head dim 64, LoRA rank 64 on the same projections, the 4-step boundaries 0-7-14-18-28,
scales halved (32-40-48-64 latent px instead of 64-80-96-128), a text sequence of 77 tokens.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from configs.common import base_config


@dataclasses.dataclass(frozen=True)
class TinyShape:
    """Every size of one benchmark setup (both frameworks build from this)."""
    num_layers: int = 6
    heads: int = 3
    head_dim: int = 64
    dual_attention_layers: tuple[int, ...] = (0, 1, 2)
    joint_dim: int = 256
    pooled_dim: int = 128
    text_tokens: int = 77
    channels: int = 16
    scales: tuple[int, ...] = (32, 40, 48, 64)
    boundaries: tuple[int, ...] = (0, 7, 14, 18, 28)
    batch: int = 4
    lora_rank: int = 64
    cls_block: int = 2
    n_fake_steps: int = 5
    cfg_teacher: float = 7.0
    remat: bool = False
    dtype: str = "float32"
    attention: str = "xla"  # ours only: config.model.attention_impl, "chunked@128" also sets attention_chunk

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def mmdit_fields(self) -> dict:
        """The SD3Transformer2DModel config fields (ours and diffusers' take the same names)."""
        top = max(self.scales)
        return dict(sample_size=top, patch_size=2, in_channels=self.channels, num_layers=self.num_layers,
                    attention_head_dim=self.head_dim, num_attention_heads=self.heads,
                    joint_attention_dim=self.joint_dim, caption_projection_dim=self.width,
                    pooled_projection_dim=self.pooled_dim, out_channels=self.channels, pos_embed_max_size=top // 2,
                    dual_attention_layers=tuple(self.dual_attention_layers), qk_norm="rms_norm")

    def run_config(self) -> ml_collections.ConfigDict:
        """configs/common.py with this shape: random base weights, all losses on, one device."""
        c = base_config()
        c.model.source = "random"
        c.model.dtype = c.model.param_dtype = self.dtype
        c.model.remat = self.remat
        impl, _, chunk = self.attention.partition("@")
        c.model.attention_impl = impl
        if chunk:
            c.model.attention_chunk = int(chunk)
        c.model.random = ml_collections.ConfigDict(self.mmdit_fields())
        c.lora.rank, c.lora.alpha = self.lora_rank, float(self.lora_rank)
        c.schedule.preset = ""
        c.schedule.scales, c.schedule.boundaries = tuple(self.scales), tuple(self.boundaries)
        c.loss.cls_blocks = c.loss.mmd_blocks = (self.cls_block,)
        c.loss.n_fake_steps = self.n_fake_steps
        c.loss.cfg_teacher = self.cfg_teacher
        c.train.batch_size = self.batch
        c.train.export_peft = False
        c.mesh.shape = (1, 1, 1)
        return c


TINY_SD35M = TinyShape()
# A seconds-long variant for the smoke tests.
MICRO = TinyShape(num_layers=2, heads=2, head_dim=16, dual_attention_layers=(0,), joint_dim=32, pooled_dim=16,
                  text_tokens=8, channels=4, scales=(8, 16), boundaries=(0, 14, 28), batch=2, lora_rank=4,
                  cls_block=0, n_fake_steps=1)


def synthetic_batches(n: int, batch: int, scale: int, prev_scale: int, channels: int, text_tokens: int,
                      joint_dim: int, pooled_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 [n, batch, ...] training batches: NHWC latents at `scale` and `prev_scale`, text embeddings."""
    rng = np.random.default_rng(seed)
    normal = lambda *d: rng.standard_normal((n, batch) + d, dtype=np.float32)
    return {"x": normal(scale, scale, channels), "x_prev": normal(prev_scale, prev_scale, channels),
            "context": normal(text_tokens, joint_dim), "pooled": normal(pooled_dim)}


def synthetic_uncond(text_tokens: int, joint_dim: int, pooled_dim: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random unconditional (empty prompt) embeddings [1, T, J] and [1, P]."""
    rng = np.random.default_rng(seed)
    return {"context": rng.standard_normal((1, text_tokens, joint_dim), dtype=np.float32),
            "pooled": rng.standard_normal((1, pooled_dim), dtype=np.float32)}


def random_batches(shape: TinyShape, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic [n_fake + 1, B, ...] batches at interval k, NHWC latents (scale s_k and s_{k-1})."""
    return synthetic_batches(shape.n_fake_steps + 1, shape.batch, shape.scales[k], shape.scales[max(k - 1, 0)],
                             shape.channels, shape.text_tokens, shape.joint_dim, shape.pooled_dim, seed)


def random_uncond(shape: TinyShape, seed: int = 1) -> dict[str, np.ndarray]:
    """Synthetic unconditional (empty prompt) embeddings [1, T, J] and [1, P]."""
    return synthetic_uncond(shape.text_tokens, shape.joint_dim, shape.pooled_dim, seed)
