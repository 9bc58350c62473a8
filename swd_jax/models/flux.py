"""FLUX.1 (diffusers `FluxTransformer2DModel`) in Flax Linen, with feature taps and LoRA: dev and schnell.

Same conventions as `swd_jax.models.mmdit`: NHWC latents in and velocity out (the 2x2 packing into 64-channel
tokens happens inside), `timestep` in 0..1000 (= 1000 sigma; diffusers' FLUX takes sigma and multiplies by 1000),
`guidance` the guidance scale per example (FLUX-dev's guidance embedding; diffusers multiplies it by 1000, so do
we), module and parameter names as diffusers' keys (`swd_jax.models.names`), LoRA in the `lora` collection.
Every Linear of the model can carry LoRA (PEFT adapts whatever `target_modules` names), norms, softmax,
modulation and RoPE run in float32.

Blocks are numbered 0..num_layers-1 (double-stream `transformer_blocks`) then num_layers..num_layers+
num_single_layers-1 (`single_transformer_blocks`); the feature of a block is its output image tokens [B, h*w, D]
(text first in the joint sequence, as diffusers: the image tokens are the last h*w).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.models.block_scan import BlockGroup, block_groups, check_features, run_group
from swd_jax.models.layers import (LoraConfig, LoraDense, RMSNorm, check_blocks_without_remat, dot_product_attention,
                                   layer_norm, remat_block, timestep_embedding)
from swd_jax.models.mmdit import FeedForward, _Common, modulate

_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
ROPE_THETA = 10000  # diffusers FluxPosEmbed(theta=10000)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The fields of diffusers' FluxTransformer2DModel config.json (FLUX.1-dev: guidance_embeds=True)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size} is not supported (FLUX.1 packs 2x2 latent patches "
                             "outside the transformer and uses patch_size=1)")
        if self.in_channels % 4 or self.out_channels != self.in_channels:
            raise ValueError(f"in_channels={self.in_channels}, out_channels={self.out_channels}: need equal "
                             "channel counts divisible by 4 (2x2-packed latents)")
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim \
                or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be 3 even sizes summing to "
                             f"attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked NHWC latents (16 for FLUX.1): in_channels / (2 x 2)."""
        return self.in_channels // 4

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FluxConfig":
        d = dict(d)
        name = d.get("_class_name", "FluxTransformer2DModel")
        if name != "FluxTransformer2DModel":
            raise ValueError(f"config is for {name!r}, expected a 'FluxTransformer2DModel' transformer config")
        for k in _DIFFUSERS_META:
            d.pop(k, None)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unsupported FluxTransformer2DModel config fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_folder(cls, folder: str) -> "FluxConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no config.json; expected a diffusers transformer folder")
        with open(path) as f:
            return cls.from_dict(json.load(f))


FLUX_DEV = FluxConfig(guidance_embeds=True)
FLUX_SCHNELL = FluxConfig()


@functools.lru_cache(maxsize=16)
def rope_tables(text_tokens: int, h: int, w: int, axes_dims: tuple[int, ...],
                theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T + h*w, head_dim] float32 of diffusers' FluxPosEmbed for ids (0,0,0) x T then (0, row, col).

    As diffusers: float64 frequencies and angles, each repeated twice (interleaved pairs), cast to float32. The
    tables depend only on the shapes, so they are numpy constants of the compiled program.
    """
    ids = np.zeros((text_tokens + h * w, 3), np.float64)
    ids[text_tokens:, 1] = np.repeat(np.arange(h), w)
    ids[text_tokens:, 2] = np.tile(np.arange(w), h)
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = np.outer(ids[:, i], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def apply_rope(x_BLHD, cos_LD, sin_LD):
    """Rotate pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) in float32 (diffusers apply_rotary_emb)."""
    x32 = x_BLHD.astype(jnp.float32)
    pairs = x32.reshape(*x32.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x32.shape)
    out = x32 * cos_LD[None, :, None] + rotated * sin_LD[None, :, None]
    return out.astype(x_BLHD.dtype)


class FluxAttention(_Common):
    """diffusers FluxAttention: RMS qk-norm, RoPE, joint softmax over [text; image]; `pre_only` has no out proj."""
    heads: int = 1
    head_dim: int = 128
    added_kv: bool = False
    pre_only: bool = False
    impl: str = "xla"
    chunk: int | None = None

    @nn.compact
    def __call__(self, x_BLD, c_BTD, cos_LD, sin_LD):
        inner = self.heads * self.head_dim

        def project(x, names, norms):
            qkv = []
            for nm, norm in zip(names, norms + (None,)):
                y = self.dense(inner, ("embed", "heads"), nm)(x).reshape(*x.shape[:2], self.heads, self.head_dim)
                if norm is not None:
                    y = RMSNorm(1e-6, "head_dim", self.param_dtype, name=norm)(y).astype(self.dtype)
                qkv.append(y)
            return qkv

        q, k, v = project(x_BLD, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if self.added_kv:
            cq, ck, cv = project(c_BTD, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, cos_LD, sin_LD), apply_rope(k, cos_LD, sin_LD)
        o_BLHD = dot_product_attention(q, k, v, self.impl, self.chunk)
        o_BLD = o_BLHD.reshape(*o_BLHD.shape[:2], inner)
        if self.pre_only:
            return o_BLD
        n_txt, d = c_BTD.shape[1], x_BLD.shape[-1]
        x_out = self.dense(d, ("heads", "embed"), "to_out_0")(o_BLD[:, n_txt:])
        c_out = self.dense(d, ("heads", "embed"), "to_add_out")(o_BLD[:, :n_txt])
        return x_out, c_out


class AdaLN(_Common):
    """SiLU -> Linear(dim, n*dim) -> n float32 chunks (AdaLayerNormZero/ZeroSingle/Continuous), LoRA-able."""
    n: int = 6

    @nn.compact
    def __call__(self, temb_BD):
        emb = self.dense(self.n * temb_BD.shape[-1], ("embed", "adaln"), "linear")(
            jax.nn.silu(temb_BD.astype(jnp.float32)).astype(self.dtype))
        return jnp.split(emb.astype(jnp.float32), self.n, axis=-1)


class DoubleBlock(_Common):
    """diffusers FluxTransformerBlock: (image x, text c) -> (text c, image x)."""
    heads: int = 1
    head_dim: int = 128
    impl: str = "xla"
    chunk: int | None = None

    @nn.compact
    def __call__(self, x_BLD, c_BTD, temb_BD, cos_LD, sin_LD):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLN(n=6, name="norm1", **kw)(temb_BD)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLN(
            n=6, name="norm1_context", **kw)(temb_BD)
        x_in = modulate(layer_norm(x_BLD), shift_msa, scale_msa).astype(self.dtype)
        c_in = modulate(layer_norm(c_BTD), c_shift_msa, c_scale_msa).astype(self.dtype)
        attn_x, attn_c = FluxAttention(heads=self.heads, head_dim=self.head_dim, added_kv=True, impl=self.impl,
                                       chunk=self.chunk, name="attn", **kw)(x_in, c_in, cos_LD, sin_LD)
        x = x_BLD + (gate_msa[:, None] * attn_x).astype(x_BLD.dtype)
        ff_in = modulate(layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        x = x + (gate_mlp[:, None] * FeedForward(name="ff", **kw)(ff_in)).astype(x.dtype)
        c = c_BTD + (c_gate_msa[:, None] * attn_c).astype(c_BTD.dtype)
        ffc_in = modulate(layer_norm(c), c_shift_mlp, c_scale_mlp).astype(self.dtype)
        c = c + (c_gate_mlp[:, None] * FeedForward(name="ff_context", **kw)(ffc_in)).astype(c.dtype)
        return c, x


class SingleBlock(_Common):
    """diffusers FluxSingleTransformerBlock on the joint [text; image] sequence: h + gate * W[attn(n); mlp(n)]."""
    heads: int = 1
    head_dim: int = 128
    impl: str = "xla"
    chunk: int | None = None

    @nn.compact
    def __call__(self, h_BLD, temb_BD, cos_LD, sin_LD):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        d = h_BLD.shape[-1]
        shift, scale, gate = AdaLN(n=3, name="norm", **kw)(temb_BD)
        n_BLD = modulate(layer_norm(h_BLD), shift, scale).astype(self.dtype)
        mlp = self.dense(4 * d, ("embed", "mlp"), "proj_mlp")(n_BLD)
        mlp = jax.nn.gelu(mlp.astype(jnp.float32), approximate=True).astype(self.dtype)
        attn = FluxAttention(heads=self.heads, head_dim=self.head_dim, pre_only=True, impl=self.impl,
                             chunk=self.chunk, name="attn", **kw)(n_BLD, None, cos_LD, sin_LD)
        out = self.dense(d, ("mlp", "embed"), "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return h_BLD + (gate[:, None] * out).astype(h_BLD.dtype)


class _MLP2(_Common):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection 'silu'), LoRA-able."""
    features: int = 0

    @nn.compact
    def __call__(self, x):
        h = self.dense(self.features, (None, "embed"), "linear_1")(x)
        h = jax.nn.silu(h.astype(jnp.float32)).astype(self.dtype)
        return self.dense(self.features, (None, "embed"), "linear_2")(h)


class _TimeTextEmbed(_Common):
    """temb = MLP(sin(t)) [+ MLP(sin(1000 g))] + MLP(pooled), diffusers CombinedTimestep[Guidance]TextProj."""
    features: int = 0

    @nn.compact
    def __call__(self, t_B, guidance_B, pooled_BP):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        temb = _MLP2(features=self.features, name="timestep_embedder", **kw)(
            timestep_embedding(t_B).astype(self.dtype)).astype(jnp.float32)
        if guidance_B is not None:
            g = guidance_B.astype(jnp.float32) * 1000.0
            temb = temb + _MLP2(features=self.features, name="guidance_embedder", **kw)(
                timestep_embedding(g).astype(self.dtype)).astype(jnp.float32)
        text = _MLP2(features=self.features, name="text_embedder", **kw)(pooled_BP.astype(self.dtype))
        return temb + text.astype(jnp.float32)


def pack_latents(x_BHWC):
    """[B, H, W, C] -> [B, (H/2)(W/2), C*4] tokens, channel order (C, 2, 2) as diffusers FluxPipeline._pack_latents."""
    B, H, W, C = x_BHWC.shape
    x = x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens_BLK, height: int, width: int):
    """Inverse of `pack_latents`: [B, (H/2)(W/2), C*4] -> [B, H, W, C]."""
    B, _, K = tokens_BLK.shape
    C = K // 4
    x = tokens_BLK.reshape(B, height // 2, width // 2, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, height, width, C)


class Flux(nn.Module):
    """FluxTransformer2DModel: (latents NHWC, timestep [B] in 0..1000, context [B,T,J], pooled [B,P], guidance [B])
    -> velocity NHWC. `guidance` (the guidance scale, e.g. 4.5) is required iff `config.guidance_embeds` (dev).

    `feature_blocks` (0-based over double then single blocks) selects blocks whose image-token output is returned
    as features; with `features_only=True` the forward stops after the last requested block.
    """
    config: FluxConfig
    lora: LoraConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "xla"
    attention_chunk: int | None = None
    remat_policy: str = "full"  # with remat: what a block keeps for the backward (layers.REMAT_POLICIES)
    blocks_without_remat: int = 0  # with remat: the last this many blocks (single-stream first) run without it
    scan_blocks: bool = False  # runs of identical blocks under one scan, params stacked (models.block_scan)
    scan_splits: tuple[int, ...] = ()  # with scan: blocks that end a group (the feature blocks the losses tap)

    def block_groups(self) -> list[BlockGroup]:
        """The blocks as this module runs them: one group per block unrolled, runs of identical blocks scanned."""
        cfg = self.config
        plain = check_blocks_without_remat(self.blocks_without_remat, cfg.num_blocks, self.remat)
        kinds = ([("transformer_blocks_", i, "double") for i in range(cfg.num_layers)]
                 + [("single_transformer_blocks_", i, "single") for i in range(cfg.num_single_layers)])
        return block_groups(kinds, scan=self.scan_blocks, splits=self.scan_splits,
                            plain_from=cfg.num_blocks - plain if self.remat else None)

    def check_latent_size(self, height: int, width: int):
        for name, s in (("height", height), ("width", width)):
            if s % 2 or s < 2:
                raise ValueError(f"latent {name} {s} must be a positive even number (FLUX packs 2x2 patches)")

    @nn.compact
    def __call__(self, x_BHWC, timestep_B, context_BTJ, pooled_BP, guidance_B=None,
                 feature_blocks: tuple[int, ...] = (), features_only: bool = False):
        cfg = self.config
        B, H, W, C = x_BHWC.shape
        self.check_latent_size(H, W)
        if C != cfg.latent_channels:
            raise ValueError(f"latents have {C} channels, the model expects {cfg.latent_channels} "
                             f"(in_channels {cfg.in_channels} = 4 x {cfg.latent_channels} after 2x2 packing)")
        if cfg.guidance_embeds and guidance_B is None:
            raise ValueError("this FLUX model has a guidance embedding (FLUX-dev): pass guidance_B, e.g. 3.5")
        if not cfg.guidance_embeds and guidance_B is not None:
            raise ValueError("this FLUX model has no guidance embedding (schnell-like): guidance_B must be None")
        bad = [i for i in feature_blocks if not 0 <= i < cfg.num_blocks]
        if bad:
            raise ValueError(f"feature_blocks {bad} outside 0..{cfg.num_blocks - 1}")
        if features_only and not feature_blocks:
            raise ValueError("features_only=True needs at least one feature block")
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, impl=self.attention_impl,
                   chunk=self.attention_chunk, **kw)
        D, h, w, T = cfg.inner_dim, H // 2, W // 2, context_BTJ.shape[1]

        x_BLD = LoraDense(D, (None, "embed"), True, self.lora, self.dtype, self.param_dtype,
                          name="x_embedder")(pack_latents(x_BHWC))
        if guidance_B is not None:
            guidance_B = jnp.broadcast_to(jnp.asarray(guidance_B, jnp.float32), (B,))
        temb = _TimeTextEmbed(features=D, name="time_text_embed", **kw)(timestep_B, guidance_B, pooled_BP)
        c_BTD = LoraDense(D, ("joint", "embed"), True, self.lora, self.dtype, self.param_dtype,
                          name="context_embedder")(context_BTJ)
        cos, sin = (jnp.asarray(a) for a in rope_tables(T, h, w, cfg.axes_dims_rope))

        act_axes = ("activation_batch", "activation_tokens", "activation_embed")
        groups = self.block_groups()
        check_features(groups, feature_blocks)

        def double_step(block, carry, temb, cos, sin):
            c, x = block(carry[1], carry[0], temb, cos, sin)
            return c, nn.with_logical_constraint(x, act_axes)

        def single_step(block, h, temb, cos, sin):
            return nn.with_logical_constraint(block(h, temb, cos, sin), act_axes)

        feats = {}
        last = max(feature_blocks) if features_only else cfg.num_blocks - 1
        h_BLD = None
        for g in groups:
            if g.start > last:
                break
            scanned = g.size > 1
            if g.kind == "double":
                block = remat_block(DoubleBlock, g.remat, self.remat_policy, self.attention_impl, scanned)(
                    name=g.name, **bkw)
                c_BTD, x_BLD = run_group(block, g.size, double_step, (c_BTD, x_BLD), temb, cos, sin)
                if g.stop - 1 in feature_blocks:
                    feats[g.stop - 1] = x_BLD
                continue
            if h_BLD is None:
                h_BLD = jnp.concatenate([c_BTD, x_BLD], axis=1)
            block = remat_block(SingleBlock, g.remat, self.remat_policy, self.attention_impl, scanned)(
                name=g.name, **bkw)
            h_BLD = run_group(block, g.size, single_step, h_BLD, temb, cos, sin)
            if g.stop - 1 in feature_blocks:
                feats[g.stop - 1] = h_BLD[:, T:]
        features = tuple(feats[i] for i in feature_blocks)
        if features_only:
            return features
        if h_BLD is None:  # no single-stream blocks
            h_BLD = jnp.concatenate([c_BTD, x_BLD], axis=1)

        scale, shift = AdaLN(n=2, name="norm_out", **kw)(temb)
        y = modulate(layer_norm(h_BLD[:, T:]), shift, scale).astype(self.dtype)
        y = LoraDense(4 * cfg.latent_channels, ("embed", None), True, self.lora, self.dtype, self.param_dtype,
                      name="proj_out")(y)
        v_BHWC = unpack_latents(y, H, W)
        return (v_BHWC, features) if feature_blocks else v_BHWC


def example_inputs(cfg: FluxConfig, batch: int, latent: int = 2, text_tokens: int = 8, dtype=jnp.float32):
    """Zero inputs with the right shapes: (latents NHWC, timestep, context, pooled, guidance or None)."""
    return (jnp.zeros((batch, latent, latent, cfg.latent_channels), dtype), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, text_tokens, cfg.joint_attention_dim), dtype),
            jnp.zeros((batch, cfg.pooled_projection_dim), dtype),
            jnp.ones((batch,), jnp.float32) if cfg.guidance_embeds else None)
