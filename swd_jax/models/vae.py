"""SD3 / FLUX AutoencoderKL in Flax Linen, NHWC: encoder to a diagonal Gaussian, decoder, latent normalisation.

Layer for layer the diffusers `AutoencoderKL` (autoencoders/autoencoder_kl.py, vae.py, resnet.py,
unet_2d_blocks.py, attention_processor.py) as SD3 and FLUX.1 configure it: `DownEncoderBlock2D` /
`UpDecoderBlock2D` blocks, a mid block with one single-head self-attention, no quant / post-quant convs
(`use_quant_conv` / `use_post_quant_conv` false in both), 16 latent channels. The two differ only in the
latent normalisation: SD3_VAE and FLUX_VAE below.
Submodule names follow the diffusers keys (`down_blocks.0` -> `down_blocks_0`) so the converter's table is
short. GroupNorm and softmax run in float32 whatever the compute `dtype`.

Images are NHWC in [-1, 1]; latents are NHWC. The diffusion model sees `normalize_latents(z)`, i.e.
`(z - shift_factor) * scaling_factor` (METHOD.md section 1), and `denormalize_latents` is its inverse.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers `AutoencoderKL` config.json that the SD3 VAE uses (defaults: SD3 / SD3.5)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels is empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: norm_num_groups={self.norm_num_groups} does not divide "
                                 f"block_out_channels entry {c}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for SD3)."""
        return 2 ** (len(self.block_out_channels) - 1)


SD3_VAE = VAEConfig()  # stabilityai/stable-diffusion-3.5-*/vae/config.json
FLUX_VAE = VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)  # black-forest-labs/FLUX.1-{dev,schnell}/vae


def normalize_latents(z_BHWC: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latent -> diffusion latent: `(z - shift_factor) * scaling_factor` (METHOD.md section 1)."""
    return (z_BHWC - config.shift_factor) * config.scaling_factor


def denormalize_latents(x_BHWC: jax.Array, config: VAEConfig) -> jax.Array:
    """Diffusion latent -> VAE latent: `x / scaling_factor + shift_factor`, the inverse of `normalize_latents`."""
    return x_BHWC / config.scaling_factor + config.shift_factor


def sample_latent(mean_BHWC: jax.Array, logvar_BHWC: jax.Array, rng: jax.Array) -> jax.Array:
    """Draw from the posterior N(mean, exp(logvar)) as diffusers' `DiagonalGaussianDistribution.sample`."""
    eps = jax.random.normal(rng, mean_BHWC.shape, jnp.float32)
    return (mean_BHWC.astype(jnp.float32) + jnp.exp(0.5 * logvar_BHWC.astype(jnp.float32)) * eps).astype(
        mean_BHWC.dtype)


class GroupNorm32(nn.Module):
    """torch.nn.GroupNorm(groups, C, eps) on NHWC: two-pass statistics and affine in float32, output in `dtype`."""

    num_groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        scale = self.param("scale", nn.initializers.ones, (C,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype)
        x = x_BHWC.astype(jnp.float32).reshape(B, H, W, self.num_groups, C // self.num_groups)
        mean = x.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
          padding="SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: norm-silu-conv twice, 1x1 shortcut when widths differ."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm32(self.groups, name="norm1", **kw)(x_BHWC))
        h = _conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.silu(GroupNorm32(self.groups, name="norm2", **kw)(h))
        h = _conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x_BHWC.shape[-1] != self.out_channels:
            x_BHWC = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x_BHWC)
        return x_BHWC.astype(self.dtype) + h


class SpatialSelfAttention(nn.Module):
    """diffusers mid-block `Attention` (one head of width C): group norm, q/k/v, softmax, out proj, residual."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h_BLC = GroupNorm32(self.groups, name="group_norm", **kw)(x_BHWC).reshape(B, H * W, C)
        q_BLC = nn.Dense(C, name="to_q", **kw)(h_BLC)
        k_BLC = nn.Dense(C, name="to_k", **kw)(h_BLC)
        v_BLC = nn.Dense(C, name="to_v", **kw)(h_BLC)
        s_BLL = jnp.einsum("bqc,bkc->bqk", q_BLC, k_BLC, preferred_element_type=jnp.float32) / math.sqrt(C)
        p_BLL = jax.nn.softmax(s_BLL, axis=-1).astype(self.dtype)
        o_BLC = jnp.einsum("bqk,bkc->bqc", p_BLL, v_BLC)
        o_BLC = nn.Dense(C, name="to_out_0", **kw)(o_BLC)
        return x_BHWC.astype(self.dtype) + o_BLC.reshape(B, H, W, C)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` with one layer: resnet, attention (optional), resnet."""

    add_attention: bool
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        C = x_BHWC.shape[-1]
        x_BHWC = ResnetBlock2D(C, self.groups, name="resnets_0", **kw)(x_BHWC)
        if self.add_attention:
            x_BHWC = SpatialSelfAttention(self.groups, name="attentions_0", **kw)(x_BHWC)
        return ResnetBlock2D(C, self.groups, name="resnets_1", **kw)(x_BHWC)


class Downsampler(nn.Module):
    """diffusers `Downsample2D(padding=0)`: zero-pad bottom and right by one, 3x3 conv with stride 2."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding="VALID")(x_BHWC)


class Upsampler(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv")(x_BHWC)


class DownEncoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`: `num_layers` resnets, then a stride-2 downsampler unless last."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x_BHWC = ResnetBlock2D(self.channels, self.groups, name=f"resnets_{j}", **kw)(x_BHWC)
        if self.add_downsample:
            x_BHWC = Downsampler(self.channels, name="downsamplers_0", **kw)(x_BHWC)
        return x_BHWC


class UpDecoderBlock(nn.Module):
    """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then a nearest-2x upsampler and conv unless last."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x_BHWC = ResnetBlock2D(self.channels, self.groups, name=f"resnets_{j}", **kw)(x_BHWC)
        if self.add_upsample:
            x_BHWC = Upsampler(self.channels, name="upsamplers_0", **kw)(x_BHWC)
        return x_BHWC


class Encoder(nn.Module):
    """diffusers `Encoder(double_z=True)`: image [B, H, W, 3] -> moments [B, H/8, W/8, 2 * latent_channels]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        h = _conv(chans[0], 3, name="conv_in", **kw)(x_BHWC.astype(self.dtype))
        for i, c in enumerate(chans):
            h = DownEncoderBlock(c, cfg.layers_per_block, groups, i < len(chans) - 1, name=f"down_blocks_{i}",
                                 **kw)(h)
        h = MidBlock(cfg.mid_block_add_attention, groups, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm32(groups, name="conv_norm_out", **kw)(h))
        return _conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """diffusers `Decoder` (group norm): latent [B, h, w, latent_channels] -> image [B, 8h, 8w, 3]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BHWC: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        h = _conv(chans[0], 3, name="conv_in", **kw)(z_BHWC.astype(self.dtype))
        h = MidBlock(cfg.mid_block_add_attention, groups, name="mid_block", **kw)(h)
        for i, c in enumerate(chans):
            h = UpDecoderBlock(c, cfg.layers_per_block + 1, groups, i < len(chans) - 1, name=f"up_blocks_{i}",
                               **kw)(h)
        h = nn.silu(GroupNorm32(groups, name="conv_norm_out", **kw)(h))
        return _conv(cfg.out_channels, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """SD3 VAE: `encode` -> (mean, logvar) of the latent posterior, `decode` -> image; `__call__` = decode(mean)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype)

    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image in [-1, 1] -> (mean, logvar clamped to [-30, 20]) in float32, each [B, H/8, W/8, latent]."""
        f = self.config.downsample_factor
        if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != self.config.in_channels:
            raise ValueError(f"VAE.encode wants images [B, H, W, {self.config.in_channels}], got {x_BHWC.shape}")
        if x_BHWC.shape[1] % f or x_BHWC.shape[2] % f:
            raise ValueError(f"VAE.encode: image size {x_BHWC.shape[1:3]} is not a multiple of {f}")
        moments = self.encoder(x_BHWC).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z_BHWC: jax.Array) -> jax.Array:
        """VAE latent (not normalised) -> image, roughly in [-1, 1], in `dtype`."""
        if z_BHWC.ndim != 4 or z_BHWC.shape[-1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode wants latents [B, h, w, {self.config.latent_channels}], got {z_BHWC.shape}")
        return self.decoder(z_BHWC)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.decode(self.encode(x_BHWC)[0])


def _in_slices(fn, x_B: jax.Array, slice_size: int) -> jax.Array:
    """Apply `fn` to `slice_size` examples at a time (lax.map), padding the batch to a multiple of it."""
    B = x_B.shape[0]
    n = max(1, -(-B // slice_size))
    pad = n * slice_size - B
    xs = jnp.pad(x_B, ((0, pad),) + ((0, 0),) * (x_B.ndim - 1)).reshape(n, slice_size, *x_B.shape[1:])
    ys = jax.lax.map(fn, xs)
    return jax.tree.map(lambda y: y.reshape(n * slice_size, *y.shape[2:])[:B], ys)


def decode_latents(vae: AutoencoderKL, params, x_BHWC: jax.Array, slice_size: int = 1) -> jax.Array:
    """Normalised diffusion latent -> image in [-1, 1] (float32), decoded `slice_size` images at a time."""
    z = denormalize_latents(x_BHWC.astype(jnp.float32), vae.config)
    out = _in_slices(lambda zs: vae.apply({"params": params}, zs, method=AutoencoderKL.decode), z, slice_size)
    return out.astype(jnp.float32)


def encode_images(vae: AutoencoderKL, params, img_BHWC: jax.Array, rng: jax.Array | None = None,
                  slice_size: int = 1) -> jax.Array:
    """Image in [-1, 1] -> normalised diffusion latent (posterior mean, or a sample when `rng` is given)."""
    mean, logvar = _in_slices(lambda xs: vae.apply({"params": params}, xs, method=AutoencoderKL.encode),
                              img_BHWC, slice_size)
    z = mean if rng is None else sample_latent(mean, logvar, rng)
    return normalize_latents(z, vae.config)


def init_params(vae: AutoencoderKL, rng: jax.Array, image_size: int = 64) -> dict:
    """Random parameters (for tests and for shapes); real weights come from `swd_jax.convert.vae`."""
    x = jnp.zeros((1, image_size, image_size, vae.config.in_channels), jnp.float32)
    return vae.init(rng, x)["params"]


def uint8_to_unit(img_BHWC: np.ndarray | jax.Array) -> jax.Array:
    """uint8 image in [0, 255] -> float32 in [-1, 1], as diffusers' `VaeImageProcessor.preprocess`."""
    return jnp.asarray(img_BHWC, jnp.float32) / 127.5 - 1.0
