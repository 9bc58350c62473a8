"""SD3 / SD3.5 MMDiT (diffusers `SD3Transformer2DModel`) in Flax Linen, with feature taps and LoRA.

Covers SD3-Medium (plain joint blocks), SD3.5-Medium (MMDiT-X: extra self-attention in `dual_attention_layers`,
RMS qk-norm) and SD3.5-Large (qk-norm). Latents are NHWC. Module and parameter names follow diffusers' keys
(see `swd_jax.models.names`), so the converter's table stays a handful of rules.

Usage: `MMDiT(cfg).apply({"params": base}, x, t, ctx, pooled)` is the teacher; adding `"lora": student_lora`
gives the student, `"lora": fake_lora` the fake score model: one module, one copy of the base weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from swd_jax.models.block_scan import BlockGroup, block_groups, check_features, run_group
from swd_jax.models.layers import (LoraConfig, LoraDense, RMSNorm, check_blocks_without_remat, dot_product_attention,
                                   layer_norm, remat_block,
                                   sincos_pos_embed_2d, timestep_embedding)

_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' SD3Transformer2DModel config.json that define the network."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported (SD3/SD3.5 use None or 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal "
                             f"num_attention_heads*attention_head_dim={self.inner_dim} (as in every SD3 model)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")
        if self.pos_embed_max_size is None:
            raise ValueError("pos_embed_max_size must be set (all SD3 checkpoints crop a fixed grid)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the NHWC latents (as FluxConfig.latent_channels, which packs 2x2 patches into in_channels)."""
        return self.in_channels

    @property
    def max_latent_size(self) -> int:
        return self.pos_embed_max_size * self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMDiTConfig":
        d = dict(d)
        name = d.get("_class_name", "SD3Transformer2DModel")
        if name != "SD3Transformer2DModel":
            raise ValueError(f"config is for {name!r}, expected an 'SD3Transformer2DModel' transformer config")
        for k in _DIFFUSERS_META:
            d.pop(k, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unsupported SD3Transformer2DModel config fields: {unknown}")
        if d.get("out_channels") is None:
            d["out_channels"] = d.get("in_channels", cls.in_channels)
        return cls(**d)

    @classmethod
    def from_folder(cls, folder: str) -> "MMDiTConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no config.json; expected a diffusers transformer folder")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(d)


# Presets with the published shapes (used by benchmarks and memory plans without weights).
SD35_MEDIUM = MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                          pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, qk_norm="rms_norm")


class _Common(nn.Module):
    """Fields every sub-module of the MMDiT carries."""
    lora: LoraConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def dense(self, features, axes, name, use_bias=True):
        return LoraDense(features, axes, use_bias, self.lora, self.dtype, self.param_dtype, name=name)


class Attention(_Common):
    """Joint attention: image tokens (and, with `added_kv`, text tokens) in one softmax, image first."""
    heads: int = 1
    head_dim: int = 64
    added_kv: bool = False
    context_pre_only: bool = False
    qk_norm: str | None = None
    impl: str = "xla"
    chunk: int | None = None  # query rows per chunk of the "chunked" attention (None: layers.ATTENTION_CHUNK)

    @nn.compact
    def __call__(self, x_BLD, c_BTD=None):
        inner = self.heads * self.head_dim

        def project(x, names, norm_names):
            out = []
            for nm in names:
                y = self.dense(inner, ("embed", "heads"), nm)(x).reshape(*x.shape[:2], self.heads, self.head_dim)
                if nm in norm_names and self.qk_norm:
                    y = RMSNorm(1e-6, "head_dim", self.param_dtype, name=norm_names[nm])(y).astype(self.dtype)
                out.append(y)
            return out

        q, k, v = project(x_BLD, ("to_q", "to_k", "to_v"), {"to_q": "norm_q", "to_k": "norm_k"})
        if self.added_kv:
            cq, ck, cv = project(c_BTD, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                 {"add_q_proj": "norm_added_q", "add_k_proj": "norm_added_k"})
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
        o_BLHD = dot_product_attention(q, k, v, self.impl, self.chunk)
        o_BLD = o_BLHD.reshape(*o_BLHD.shape[:2], inner)
        n_img = x_BLD.shape[1]
        x_out = self.dense(x_BLD.shape[-1], ("heads", "embed"), "to_out_0")(o_BLD[:, :n_img])
        if not self.added_kv:
            return x_out
        c_out = None
        if not self.context_pre_only:
            c_out = self.dense(x_BLD.shape[-1], ("heads", "embed"), "to_add_out")(o_BLD[:, n_img:])
        return x_out, c_out


class FeedForward(_Common):
    """Linear -> GELU(tanh) -> Linear, 4x wide (diffusers FeedForward 'gelu-approximate')."""

    @nn.compact
    def __call__(self, x_BLD):
        d = x_BLD.shape[-1]
        up = _NetProj(features=4 * d, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x_BLD)
        up = jax.nn.gelu(up.astype(jnp.float32), approximate=True).astype(self.dtype)
        return self.dense(d, ("mlp", "embed"), "net_2")(up)


class _NetProj(_Common):
    """The `net.0` GELU module of diffusers: only its inner `proj` Linear has weights."""
    features: int = 0

    @nn.compact
    def __call__(self, x):
        return self.dense(self.features, ("embed", "mlp"), "proj")(x)


def modulate(x32_BLD, shift_BD, scale_BD):
    """x * (1 + scale) + shift, broadcast over tokens, float32."""
    return x32_BLD * (1.0 + scale_BD[:, None]) + shift_BD[:, None]


class AdaLN(_Common):
    """SiLU -> Linear(dim, n*dim) -> n chunks (float32): the adaLN-Zero/Continuous/SD35-X modulation."""
    n: int = 6

    @nn.compact
    def __call__(self, temb_BD):
        d = temb_BD.shape[-1]
        emb = LoraDense(self.n * d, ("embed", "adaln"), True, None, self.dtype, self.param_dtype, name="linear")(
            jax.nn.silu(temb_BD.astype(jnp.float32)).astype(self.dtype))
        return jnp.split(emb.astype(jnp.float32), self.n, axis=-1)


class JointBlock(_Common):
    """diffusers JointTransformerBlock; returns (context, image) hidden states (context None in the last block)."""
    heads: int = 1
    head_dim: int = 64
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: str | None = None
    impl: str = "xla"
    chunk: int | None = None

    @nn.compact
    def __call__(self, x_BLD, c_BTD, temb_BD):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm, impl=self.impl, chunk=self.chunk,
                   **kw)
        mods = AdaLN(n=9 if self.dual_attention else 6, name="norm1", **kw)(temb_BD)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = layer_norm(x_BLD)
        x_in = modulate(x_norm, shift_msa, scale_msa).astype(self.dtype)

        c_norm = layer_norm(c_BTD)
        if self.context_pre_only:
            c_scale, c_shift = AdaLN(n=2, name="norm1_context", **kw)(temb_BD)
            c_in = modulate(c_norm, c_shift, c_scale).astype(self.dtype)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLN(
                n=6, name="norm1_context", **kw)(temb_BD)
            c_in = modulate(c_norm, c_shift_msa, c_scale_msa).astype(self.dtype)

        attn_x, attn_c = Attention(added_kv=True, context_pre_only=self.context_pre_only, name="attn", **akw)(
            x_in, c_in)
        x = x_BLD + (gate_msa[:, None] * attn_x).astype(x_BLD.dtype)
        if self.dual_attention:
            shift2, scale2, gate2 = mods[6:]
            attn2 = Attention(name="attn2", **akw)(modulate(x_norm, shift2, scale2).astype(self.dtype))
            x = x + (gate2[:, None] * attn2).astype(x.dtype)
        ff_in = modulate(layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        x = x + (gate_mlp[:, None] * FeedForward(name="ff", **kw)(ff_in)).astype(x.dtype)

        if self.context_pre_only:
            return None, x
        c = c_BTD + (c_gate_msa[:, None] * attn_c).astype(c_BTD.dtype)
        ffc_in = modulate(layer_norm(c), c_shift_mlp, c_scale_mlp).astype(self.dtype)
        c = c + (c_gate_mlp[:, None] * FeedForward(name="ff_context", **kw)(ffc_in)).astype(c.dtype)
        return c, x


class MMDiT(nn.Module):
    """SD3Transformer2DModel: (latents NHWC, timestep [B] in 0..1000, context [B,T,J], pooled [B,P]) -> velocity.

    `feature_blocks` (0-based) selects blocks whose image-token output is returned as features. With
    `features_only=True` the forward stops after the last requested block and returns only the features.
    """
    config: MMDiTConfig
    lora: LoraConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "xla"
    attention_chunk: int | None = None  # "chunked" attention only: query rows per chunk
    remat_policy: str = "full"  # with remat: what a block keeps for the backward (layers.REMAT_POLICIES)
    blocks_without_remat: int = 0  # with remat: the last this many blocks run without it (keep all activations)
    scan_blocks: bool = False  # runs of identical blocks under one scan, params stacked (models.block_scan)
    scan_splits: tuple[int, ...] = ()  # with scan: blocks that end a group (the feature blocks the losses tap)

    def block_groups(self) -> list[BlockGroup]:
        """The blocks as this module runs them: one group per block unrolled, runs of identical blocks scanned."""
        cfg = self.config
        plain = check_blocks_without_remat(self.blocks_without_remat, cfg.num_layers, self.remat)
        plain_from = cfg.num_layers - plain if self.remat else None
        kinds = [("transformer_blocks_", i, (i in cfg.dual_attention_layers, i == cfg.num_layers - 1))
                 for i in range(cfg.num_layers)]
        return block_groups(kinds, scan=self.scan_blocks, splits=self.scan_splits, plain_from=plain_from)

    def check_latent_size(self, height: int, width: int):
        cfg = self.config
        for name, s in (("height", height), ("width", width)):
            if s % cfg.patch_size:
                raise ValueError(f"latent {name} {s} is not divisible by patch_size {cfg.patch_size}")
            if s > cfg.max_latent_size:
                raise ValueError(f"latent {name} {s} exceeds the position-embedding grid: pos_embed_max_size "
                                 f"{cfg.pos_embed_max_size} x patch {cfg.patch_size} = {cfg.max_latent_size}")

    @nn.compact
    def __call__(self, x_BHWC, timestep_B, context_BTJ, pooled_BP, feature_blocks: tuple[int, ...] = (),
                 features_only: bool = False):
        cfg, p = self.config, self.config.patch_size
        B, H, W, C = x_BHWC.shape
        self.check_latent_size(H, W)
        if C != cfg.in_channels:
            raise ValueError(f"latents have {C} channels, the model expects {cfg.in_channels}")
        bad = [i for i in feature_blocks if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"feature_blocks {bad} outside 0..{cfg.num_layers - 1}")
        if features_only and not feature_blocks:
            raise ValueError("features_only=True needs at least one feature block")
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        D, h, w = cfg.inner_dim, H // p, W // p

        # Patch embedding (a stride-p conv as a matmul over flattened p x p x C patches) + cropped sin-cos table.
        patches = x_BHWC.reshape(B, h, p, w, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, h * w, p * p * C)
        x_BLD = _PatchEmbed(cfg, name="pos_embed", dtype=self.dtype, param_dtype=self.param_dtype)(patches, h, w)

        temb = _TimeTextEmbed(D, name="time_text_embed", dtype=self.dtype, param_dtype=self.param_dtype)(
            timestep_B, pooled_BP)
        c_BTD = LoraDense(D, ("joint", "embed"), True, None, self.dtype, self.param_dtype,
                          name="context_embedder")(context_BTJ)

        groups = self.block_groups()
        check_features(groups, feature_blocks)
        act_axes = ("activation_batch", "activation_tokens", "activation_embed")

        def step(block, carry, temb):
            c, x = block(carry[1], carry[0], temb)
            return c, nn.with_logical_constraint(x, act_axes)

        feats = {}
        last = max(feature_blocks) if features_only else cfg.num_layers - 1
        for g in groups:
            if g.start > last:
                break
            dual, pre_only = g.kind
            block_cls = remat_block(JointBlock, g.remat, self.remat_policy, self.attention_impl, g.size > 1)
            block = block_cls(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                              context_pre_only=pre_only, dual_attention=dual, qk_norm=cfg.qk_norm,
                              impl=self.attention_impl, chunk=self.attention_chunk, name=g.name, **kw)
            c_BTD, x_BLD = run_group(block, g.size, step, (c_BTD, x_BLD), temb)
            if g.stop - 1 in feature_blocks:
                feats[g.stop - 1] = x_BLD
        features = tuple(feats[i] for i in feature_blocks)
        if features_only:
            return features

        scale, shift = AdaLN(n=2, name="norm_out", dtype=self.dtype, param_dtype=self.param_dtype)(temb)
        y = modulate(layer_norm(x_BLD), shift, scale).astype(self.dtype)
        y = LoraDense(p * p * cfg.out_channels, ("embed", None), True, None, self.dtype, self.param_dtype,
                      name="proj_out")(y)
        v_BHWC = y.reshape(B, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5).reshape(
            B, H, W, cfg.out_channels)
        return (v_BHWC, features) if feature_blocks else v_BHWC


class _PatchEmbed(nn.Module):
    """diffusers PatchEmbed for SD3: conv p x p stride p (kernel stored HWIO) + the centre crop of the table."""
    config: MMDiTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches_BLK, h: int, w: int):
        cfg, p = self.config, self.config.patch_size
        D, m = cfg.inner_dim, cfg.pos_embed_max_size
        proj = LoraDense(D, (None, "embed"), True, None, self.dtype, self.param_dtype, name="proj")
        x = proj(patches_BLK)
        init = lambda _: jnp.asarray(sincos_pos_embed_2d(D, m, cfg.sample_size // p), self.param_dtype)[None]
        table = self.param("pos_embed", nn.with_logical_partitioning(init, (None, None, "embed")))  # [1, m*m, D]
        top, left = (m - h) // 2, (m - w) // 2
        crop = table.reshape(m, m, D)[top:top + h, left:left + w].reshape(1, h * w, D)
        return x + crop.astype(self.dtype)


class _MLP2(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection with act 'silu')."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = LoraDense(self.features, (None, "embed"), True, None, self.dtype, self.param_dtype, name="linear_1")(x)
        h = jax.nn.silu(h.astype(jnp.float32)).astype(self.dtype)
        return LoraDense(self.features, (None, "embed"), True, None, self.dtype, self.param_dtype,
                         name="linear_2")(h)


class _TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(pooled) (diffusers CombinedTimestepTextProjEmbeddings), in float32."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t_B, pooled_BP):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_emb = _MLP2(self.features, name="timestep_embedder", **kw)(timestep_embedding(t_B).astype(self.dtype))
        p_emb = _MLP2(self.features, name="text_embedder", **kw)(pooled_BP.astype(self.dtype))
        return t_emb.astype(jnp.float32) + p_emb.astype(jnp.float32)


def example_inputs(cfg: MMDiTConfig, batch: int, latent: int | None = None, text_tokens: int = 8,
                   dtype=jnp.float32):
    """Zero inputs with the right shapes: (latents NHWC, timestep, context, pooled)."""
    s = latent or 2 * cfg.patch_size
    return (jnp.zeros((batch, s, s, cfg.in_channels), dtype), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, text_tokens, cfg.joint_attention_dim), dtype),
            jnp.zeros((batch, cfg.pooled_projection_dim), dtype))
