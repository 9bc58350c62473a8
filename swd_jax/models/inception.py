"""The FID InceptionV3 (pytorch-fid's `InceptionV3([3], use_fid_inception=True)`) in Flax Linen: pool3 features.

Layer for layer torchvision's `Inception3` with pytorch-fid's FID patches (`FIDInceptionA/C/E_1/E_2`: average
pools that do not count the zero padding, and a max pool in the last block), the network TF's FID used
(`pt_inception-2015-12-05` weights). Input: images in [0, 1], NHWC, any size; as pytorch-fid with its defaults
(`resize_input=True, normalize_input=True`) they are bilinearly resized to 299 x 299 (torch's
`align_corners=False`, no antialias) and mapped to [-1, 1]. Output: the 2048-d final average pool, [B, 2048].
Submodules are named as the torch modules (`Mixed_5b/branch5x5_1/conv`, `.../bn`), so the converter
(`swd_jax.convert.inception`) maps keys one to one. Batch norm runs in inference mode from the stored
running statistics, which live in `params` (`mean`, `var`) since nothing here trains.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from swd_jax.method.resize import bilinear_resize

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision's BasicConv2d
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision `BasicConv2d`: conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST, name="conv")(x_BHWC)
        return jax.nn.relu(_BatchNorm(name="bn")(x))


class _BatchNorm(nn.Module):
    """torch `BatchNorm2d` in eval mode: (x - mean) / sqrt(var + eps) * scale + bias."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """`F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)` (the FID patch)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`F.max_pool2d(x, 3, stride=2)`, no padding, floor mode."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and (padding-excluding) average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(BasicConv2d(48, 1, name="branch5x5_1")(x))
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): strided 3x3, strided double 3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: 1x1, factorised 7x7, double factorised 7x7 and average-pool branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): 3x3, factorised 7x7 then strided 3x3, and max-pool branches."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(BasicConv2d(192, 1, name="branch3x3_1")(x))
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`pool="avg"`, padding-excluding) and Mixed_7c (`pool="max"`, the FID network's quirk)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            p = _avg_pool_3x3(x)
        else:
            p = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, 1, name="branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] float32 (pytorch-fid, output block 3).

    `resize_input=False` skips the 299 x 299 resize (the network is fully convolutional; inputs must be at
    least 75 px); pytorch-fid's FID always resizes.
    """

    resize_input: bool = True

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
            raise ValueError(f"Inception: expected images [B, H, W, 3], got shape {images_BHWC.shape}")
        x = images_BHWC.astype(jnp.float32)
        if self.resize_input:
            x = bilinear_resize(x, INPUT_SIZE)
        if min(x.shape[1:3]) < 75:
            raise ValueError(f"Inception: input {x.shape[1]}x{x.shape[2]} is below the 75 px minimum")
        x = 2.0 * x - 1.0
        # block 0
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        # block 1
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        # block 2
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, name=name)(x)
        # block 3
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))
