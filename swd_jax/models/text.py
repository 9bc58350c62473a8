"""SD3's and FLUX's text encoders in Flax Linen: CLIP text model with projection (CLIP-L, CLIP-G; FLUX's CLIP-L
without it) and the T5 v1.1 encoder.

Layer for layer transformers' `CLIPTextModelWithProjection` / `CLIPTextModel` (models/clip/modeling_clip.py) and
`T5EncoderModel` (models/t5/modeling_t5.py); submodule names follow their keys (`layers.3` -> `layers_3`)
so the converter's table is short. LayerNorm / RMSNorm and softmax run in float32, and the residual stream
is kept in float32 whatever the compute `dtype` (matmuls run in `dtype`).

T5 and half precision: T5 activations overflow float16 (transformers clamps them and keeps `wo` in
float32). Here float16 compute is refused; at bfloat16 (float32's exponent range, so no overflow) the
residual stream, norms, softmax and the FF output projection `wo` stay float32, as transformers does.
The SD3 T5 checkpoint is stored in float16: keep `param_dtype=float32` where memory allows (bf16 storage
drops 3 mantissa bits of every weight).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = jnp.dtype
_NEG = float(jnp.finfo(jnp.float32).min)

CLIP_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP-L
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # CLIP-G (erf form, torch's default)
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers CLIPTextConfig that the text model with projection uses."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} not in {sorted(CLIP_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers T5Config that a T5 v1.1 encoder uses (gated GELU-tanh feed-forward)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


def _layer_norm(x: jax.Array, eps: float, param_dtype: Dtype, name: str) -> jax.Array:
    """torch LayerNorm in float32 (two-pass variance); returns float32."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                        name=name)(x.astype(jnp.float32))


def _attend(q_BLHD: jax.Array, k_BLHD: jax.Array, v_BLHD: jax.Array, scale: float, bias_BHLL: jax.Array | None,
            mask_BHLL: jax.Array | None, dtype: Dtype) -> jax.Array:
    """softmax(scale q k^T + bias, masked) v with float32 scores and softmax; returns [B, L, H * D] in `dtype`."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q_BLHD, k_BLHD, preferred_element_type=jnp.float32) * scale
    if bias_BHLL is not None:
        s = s + bias_BHLL.astype(jnp.float32)
    if mask_BHLL is not None:
        s = jnp.where(mask_BHLL, s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v_BLHD)
    return o.reshape(*o.shape[:2], -1)


# ----------------------------------------------------------------------------------------------- CLIP


class CLIPAttention(nn.Module):
    """transformers `CLIPAttention`: q/k/v/out projections with bias, scale head_dim^-0.5."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BHLL: jax.Array) -> jax.Array:
        cfg = self.config
        H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = x_BLD.astype(self.dtype)
        q, k, v = (dense(n)(x).reshape(*x.shape[:2], H, D) for n in ("q_proj", "k_proj", "v_proj"))
        o = _attend(q, k, v, D ** -0.5, None, mask_BHLL, self.dtype)
        return dense("out_proj")(o)


class CLIPMLP(nn.Module):
    """transformers `CLIPMLP`: fc1, activation (quick-GELU or GELU), fc2."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x_BLD.astype(self.dtype))
        h = CLIP_ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)); x + mlp(ln2(x)); residual in float32."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BHLL: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm(x_BLD, cfg.layer_norm_eps, self.param_dtype, "layer_norm1")
        x_BLD = x_BLD + CLIPAttention(cfg, name="self_attn", **kw)(h, mask_BHLL).astype(jnp.float32)
        h = _layer_norm(x_BLD, cfg.layer_norm_eps, self.param_dtype, "layer_norm2")
        return x_BLD + CLIPMLP(cfg, name="mlp", **kw)(h).astype(jnp.float32)


class CLIPEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding."""

    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, param_dtype=self.param_dtype,
                       name="position_embedding")
        return (tok(ids_BL).astype(jnp.float32)
                + pos(jnp.arange(ids_BL.shape[1])[None]).astype(jnp.float32))


class CLIPEncoder(nn.Module):
    """The stack of layers; returns every hidden state (embeddings first), as `output_hidden_states=True`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BHLL: jax.Array) -> tuple[jax.Array, ...]:
        states = [x_BLD]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(
                states[-1], mask_BHLL))
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """transformers `CLIPTextModel` body: embeddings, causal encoder, final LayerNorm, pooled EOS token."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> dict:
        cfg = self.config
        B, L = ids_BL.shape
        if L > cfg.max_position_embeddings:
            raise ValueError(f"CLIP: sequence length {L} > max_position_embeddings {cfg.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
        if attention_mask_BL is not None:
            mask = mask & attention_mask_BL.astype(bool)[:, None, None, :]
        x = CLIPEmbeddings(cfg, self.param_dtype, name="embeddings")(ids_BL)
        states = CLIPEncoder(cfg, self.dtype, self.param_dtype, name="encoder")(x, mask)
        last = _layer_norm(states[-1], cfg.layer_norm_eps, self.param_dtype, "final_layer_norm")
        if cfg.eos_token_id == 2:  # legacy configs: the EOT token is the highest id (transformers' rule)
            eos_idx_B = jnp.argmax(ids_BL, axis=-1)
        else:  # first occurrence of eos_token_id
            eos_idx_B = jnp.argmax((ids_BL == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(B), eos_idx_B]
        return dict(hidden_states=states, last_hidden_state=last, pooler_output=pooled)


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel` (FLUX's CLIP-L: no projection): `hidden_states`, `last_hidden_state`,
    `pooler_output`; all float32."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> dict:
        return CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            ids_BL, attention_mask_BL)


class CLIPTextModelWithProjection(nn.Module):
    """CLIP text encoder: `hidden_states` (embeddings + each layer), `last_hidden_state`, `pooler_output`,
    `text_embeds` = text_projection(pooler_output); all float32."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> dict:
        out = CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            ids_BL, attention_mask_BL)
        proj = nn.Dense(self.config.projection_dim, use_bias=False, dtype=jnp.float32,
                        param_dtype=self.param_dtype, name="text_projection")
        return dict(out, text_embeds=proj(out["pooler_output"]))


# ----------------------------------------------------------------------------------------------- T5


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucketing of `key_pos - query_pos`, in numpy float32 as transformers computes it."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    n = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log(n.astype(np.float32) / np.float32(max_exact))
                             / np.float32(math.log(max_distance / max_exact))
                             * np.float32(num_buckets - max_exact))
    large = np.where(is_small, 0, large).astype(np.int64)  # float -> int truncates, as torch's .to(long)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, n, large)


def t5_position_buckets(length: int, config: T5Config) -> np.ndarray:
    """[L, L] int32 bucket index of every (query, key) pair, computed on the host at trace time."""
    pos = np.arange(length, dtype=np.int64)
    return relative_position_bucket(pos[None, :] - pos[:, None], config.relative_attention_num_buckets,
                                    config.relative_attention_max_distance).astype(np.int32)


class T5LayerNorm(nn.Module):
    """T5 RMSNorm (no mean, no bias) in float32; returns float32."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x_BLD.shape[-1],), self.param_dtype)
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return scale.astype(jnp.float32) * x


class T5Attention(nn.Module):
    """transformers `T5Attention` (encoder): no biases, no 1/sqrt(d) scale, relative position bias added."""

    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, bias_BHLL: jax.Array | None, mask_BHLL: jax.Array | None):
        cfg = self.config
        H, D = cfg.num_heads, cfg.d_kv
        dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
        x = x_BLD.astype(self.dtype)
        q, k, v = (dense(H * D, n)(x).reshape(*x.shape[:2], H, D) for n in ("q", "k", "v"))
        if self.has_relative_attention_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, H, param_dtype=self.param_dtype,
                             name="relative_attention_bias")
            bias_BHLL = jnp.transpose(table(jnp.asarray(t5_position_buckets(x.shape[1], cfg))), (2, 0, 1))[None]
            bias_BHLL = bias_BHLL.astype(jnp.float32)
        o = _attend(q, k, v, 1.0, bias_BHLL, mask_BHLL, self.dtype)
        return dense(cfg.d_model, "o")(o), bias_BHLL


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, bias_BHLL, mask_BHLL):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x_BLD)
        h, bias_BHLL = T5Attention(self.config, self.has_relative_attention_bias, self.dtype, self.param_dtype,
                                   name="SelfAttention")(h, bias_BHLL, mask_BHLL)
        return x_BLD + h.astype(jnp.float32), bias_BHLL


class T5DenseGatedActDense(nn.Module):
    """gelu_tanh(wi_0 x) * (wi_1 x), then `wo` in float32 (transformers' `_keep_in_fp32_modules = ["wo"]`)."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda f, name, dt: nn.Dense(f, use_bias=False, dtype=dt, param_dtype=self.param_dtype, name=name)
        x = x_BLD.astype(self.dtype)
        h = jax.nn.gelu(dense(cfg.d_ff, "wi_0", self.dtype)(x), approximate=True) * dense(cfg.d_ff, "wi_1",
                                                                                           self.dtype)(x)
        return dense(cfg.d_model, "wo", jnp.float32)(h.astype(jnp.float32))


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x_BLD)
        return x_BLD + T5DenseGatedActDense(self.config, self.dtype, self.param_dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, bias_BHLL, mask_BHLL):
        x_BLD, bias_BHLL = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.dtype,
                                                self.param_dtype, name="layer_0")(x_BLD, bias_BHLL, mask_BHLL)
        return T5LayerFF(self.config, self.dtype, self.param_dtype, name="layer_1")(x_BLD), bias_BHLL


class T5Stack(nn.Module):
    """Encoder blocks (the first one owns the relative position bias table) and the final RMSNorm."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BHLL: jax.Array | None) -> jax.Array:
        bias = None
        for i in range(self.config.num_layers):
            x_BLD, bias = T5Block(self.config, i == 0, self.dtype, self.param_dtype, name=f"block_{i}")(
                x_BLD, bias, mask_BHLL)
        return T5LayerNorm(self.config.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x_BLD)


class T5EncoderModel(nn.Module):
    """T5 v1.1 encoder: ids [B, L] (+ optional padding mask) -> last hidden state [B, L, d_model] float32."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        if jnp.dtype(self.dtype) == jnp.float16:
            raise ValueError("T5 overflows in float16; use dtype=bfloat16 (residual and norms stay float32) "
                             "or float32")
        x = nn.Embed(self.config.vocab_size, self.config.d_model, param_dtype=self.param_dtype, name="shared")(
            ids_BL).astype(jnp.float32)
        mask = None if attention_mask_BL is None else attention_mask_BL.astype(bool)[:, None, None, :]
        return T5Stack(self.config, self.dtype, self.param_dtype, name="encoder")(x, mask)
