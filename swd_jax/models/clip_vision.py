"""transformers `CLIPModel` in Flax Linen: our CLIP text tower plus the ViT vision tower and both projections.

The scorers of the paper (CLIP ViT-H-14 laion2B, PickScore_v1) are `CLIPModel` checkpoints. The text side is
`swd_jax.models.text.CLIPTextTransformer`; the vision side is transformers' `CLIPVisionTransformer`: patch conv
(no bias) + class token + learned positions, `pre_layrnorm`, the same pre-norm encoder layers (no mask),
`post_layernorm` of the class token. `get_image_features` / `get_text_features` return the projected
embeddings (transformers' `get_*_features(...).pooler_output`). Images are NHWC, already preprocessed
(`image_chain.clip_input`). Submodule names follow the torch keys for the converter (`swd_jax.convert.clip`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from swd_jax.models.text import CLIP_ACTIVATIONS, CLIPEncoder, CLIPTextConfig, CLIPTextTransformer, _layer_norm

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers CLIPVisionConfig the vision tower uses."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig: hidden_act {self.hidden_act!r} not in {sorted(CLIP_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers CLIPConfig: both towers and the shared projection width."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (stride = kernel = patch, no bias), class token prepended, learned positions added."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        cfg = self.config
        B, H, W, _ = pixels_BHWC.shape
        if H != cfg.image_size or W != cfg.image_size:
            raise ValueError(f"CLIP vision: input {H}x{W} does not match the model's {cfg.image_size}")
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
                              pixels_BHWC.astype(self.dtype))
        patches = patches.reshape(B, -1, cfg.hidden_size).astype(jnp.float32)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (B, 1, cfg.hidden_size)), patches], axis=1)
        pos = nn.Embed(x.shape[1], cfg.hidden_size, param_dtype=self.param_dtype, name="position_embedding")
        return x + pos(jnp.arange(x.shape[1])[None]).astype(jnp.float32)


class CLIPVisionTransformer(nn.Module):
    """transformers `CLIPVisionTransformer`: returns `last_hidden_state` and `pooler_output` (the class token
    after `post_layernorm`), float32."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> dict:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixels_BHWC)
        x = _layer_norm(x, cfg.layer_norm_eps, self.param_dtype, "pre_layrnorm")  # sic, transformers' name
        last = CLIPEncoder(cfg, self.dtype, self.param_dtype, name="encoder")(x, None)[-1]
        pooled = _layer_norm(last[:, 0], cfg.layer_norm_eps, self.param_dtype, "post_layernorm")
        return dict(last_hidden_state=last, pooler_output=pooled)


class CLIPModel(nn.Module):
    """Both towers, `visual_projection`, `text_projection` (no bias) and the scalar `logit_scale` (log)."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(cfg.text, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, **kw)
        proj = lambda name: nn.Dense(cfg.projection_dim, use_bias=False, dtype=jnp.float32,
                                     param_dtype=self.param_dtype, name=name)
        self.text_projection = proj("text_projection")
        self.visual_projection = proj("visual_projection")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def get_image_features(self, pixels_BHWC: jax.Array) -> jax.Array:
        """[B, H, W, C] preprocessed pixels -> [B, projection_dim] (unnormalised) image embeddings."""
        return self.visual_projection(self.vision_model(pixels_BHWC)["pooler_output"])

    def get_text_features(self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        """[B, L] token ids (+ padding mask) -> [B, projection_dim] (unnormalised) text embeddings."""
        return self.text_projection(self.text_model(ids_BL, attention_mask_BL)["pooler_output"])

    def __call__(self, pixels_BHWC: jax.Array, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None):
        """(image_embeds, text_embeds, logit_scale): what transformers' CLIPModel.forward builds logits from."""
        return (self.get_image_features(pixels_BHWC), self.get_text_features(ids_BL, attention_mask_BL),
                self.logit_scale)
