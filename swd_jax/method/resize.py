"""Torch-exact latent resizing: area (adaptive average pooling) down, Keys a=-0.75 bicubic up (METHOD.md s.2).

Both are separable linear maps, so each is two small [out, in] matrices built in numpy at trace time and
applied with einsum at HIGHEST precision (exact on any backend, jit-friendly, no gathers).
- area = torch `F.interpolate(mode="area")` = `adaptive_avg_pool2d`: output i averages input rows
  floor(i*in/out) .. ceil((i+1)*in/out) - 1 (bins overlap at non-integer ratios, e.g. 128 -> 96).
- bicubic = torch `F.interpolate(mode="bicubic", align_corners=False)`: source coordinate
  (i + 0.5) * in/out - 0.5, Keys cubic kernel with a = -0.75 on the 4 nearest rows, indices clamped to
  the border. `jax.image.resize(method="cubic")` uses a = -0.5 and does not match. jax's
  "cubic-pytorch" (antialias=False) agrees with this to float rounding; we keep our matrices so both ops
  share one code path and the weights are compile-time constants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's bicubic Keys coefficient


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 adaptive-average-pooling weights (torch `mode="area"`); each row sums to 1.

    >>> from swd_jax.method.resize import area_matrix
    >>> area_matrix(3, 2).tolist()   # overlapping bins at a non-integer ratio
    [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
    """
    _check_sizes(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


def _cubic_weights(t: np.float32) -> tuple[np.float32, ...]:
    """Keys cubic weights (a = -0.75) of the rows at offsets -1, 0, 1, 2 for fractional position t."""
    a, one, two = np.float32(_A), np.float32(1), np.float32(2)

    def near(x):  # |x| <= 1
        return ((a + two) * x - (a + np.float32(3))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    return far(t + one), near(t), near(one - t), far(two - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 bicubic interpolation weights (torch `mode="bicubic"`, align_corners=False).

    Coordinates and weights are computed in float32 as torch's CPU kernel does (scale = in/out in float32,
    src = scale * (i + 0.5) - 0.5 rounded once, as its fused multiply-add), so the weights carry torch's
    own rounding: max |ours - torch| ~2e-6 on N(0, 1) inputs, vs ~1e-5 with float64 coordinates.

    >>> import numpy as np
    >>> from swd_jax.method.resize import bicubic_matrix
    >>> m = bicubic_matrix(2, 4)
    >>> m.shape, np.round(m.sum(axis=1).astype(float), 6).tolist()   # rows sum to 1
    ((4, 2), [1.0, 1.0, 1.0, 1.0])
    >>> np.round(m[1].astype(float), 5).tolist()      # source 0.25: rows -1 and 0 (clamped), 1 and 2 (clamped)
    [0.77344, 0.22656]
    """
    _check_sizes(in_size, out_size)
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float32)
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        src = f32(np.float64(scale) * (i + 0.5) - 0.5)  # torch's fused multiply-add: one rounding
        base = np.floor(src)
        for off, w in zip((-1, 0, 1, 2), _cubic_weights(f32(src - base))):
            m[i, min(max(int(base) + off, 0), in_size - 1)] += w
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 bilinear weights (torch `mode="bilinear"`, align_corners=False, no antialias).

    torch's CPU kernel: src = max(in/out * (i + 0.5) - 0.5, 0) in float32, rows floor(src) and the next one
    (clamped at the last row), weights 1 - frac and frac. pytorch-fid resizes Inception inputs this way.

    >>> from swd_jax.method.resize import bilinear_matrix
    >>> bilinear_matrix(2, 4).tolist()
    [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    """
    _check_sizes(in_size, out_size)
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float32)
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        src = max(f32(np.float64(scale) * (i + 0.5) - 0.5), f32(0))
        i0 = int(np.floor(src))
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        frac = f32(src - f32(i0))
        m[i, i0] += f32(1) - frac
        m[i, i1] += frac
    m.setflags(write=False)
    return m


def _check_sizes(in_size: int, out_size: int):
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _apply(x: jnp.ndarray, size, layout: str, matrix_fn) -> jnp.ndarray:
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D {layout} array, got shape {x.shape}")
    if layout == "NHWC":
        h_axis, eq = 1, "oh,bhwc,pw->bopc"
    elif layout == "NCHW":
        h_axis, eq = 2, "oh,bchw,pw->bcop"
    else:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    (h, w), (oh, ow) = x.shape[h_axis:h_axis + 2], _hw(size)
    if (h, w) == (oh, ow):
        return x
    compute = jnp.promote_types(x.dtype, jnp.float32)
    mh = jnp.asarray(matrix_fn(h, oh), compute)
    mw = jnp.asarray(matrix_fn(w, ow), compute)
    y = jnp.einsum(eq, mh, x.astype(compute), mw, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def area_resize(x: jnp.ndarray, size: int | tuple[int, int], layout: str = "NHWC") -> jnp.ndarray:
    """Adaptive-average-pool x to `size` (torch `interpolate(mode="area")`); identity if already that size.

    Computed in float32 (or wider), returned in x's dtype. At integer ratios the mean is preserved (to rounding).

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.resize import area_resize
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)                    # NHWC
    >>> area_resize(x, 2)[0, :, :, 0].tolist()                      # 2x2 block means
    [[2.5, 4.5], [10.5, 12.5]]
    >>> area_resize(x.transpose(0, 3, 1, 2), (1, 2), layout="NCHW").shape
    (1, 1, 1, 2)
    """
    return _apply(x, size, layout, area_matrix)


def bicubic_resize(x: jnp.ndarray, size: int | tuple[int, int], layout: str = "NHWC") -> jnp.ndarray:
    """Bicubic-resize x to `size` (torch `interpolate(mode="bicubic", align_corners=False)`, a = -0.75).

    Computed in float32 (or wider), returned in x's dtype; constants are kept exactly.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.resize import bicubic_resize
    >>> y = bicubic_resize(jnp.full((2, 3, 3, 4), 0.5, jnp.bfloat16), 5)
    >>> y.shape, y.dtype, float(y.min()), float(y.max())
    ((2, 5, 5, 4), dtype(bfloat16), 0.5, 0.5)
    """
    return _apply(x, size, layout, bicubic_matrix)


def bilinear_resize(x: jnp.ndarray, size: int | tuple[int, int], layout: str = "NHWC") -> jnp.ndarray:
    """Bilinear-resize x to `size` (torch `interpolate(mode="bilinear", align_corners=False)`, no antialias).

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.resize import bilinear_resize
    >>> bilinear_resize(jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1), (1, 4)).ravel().tolist()
    [0.0, 0.25, 0.75, 1.0]
    """
    return _apply(x, size, layout, bilinear_matrix)


def resize(x: jnp.ndarray, size: int | tuple[int, int], layout: str = "NHWC") -> jnp.ndarray:
    """SwD resize: area when shrinking, bicubic when growing, identity when equal (per spatial axis pair).

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.resize import resize
    >>> x = jnp.ones((1, 8, 8, 16))
    >>> resize(x, 4).shape, resize(x, 12).shape, resize(x, 8) is x
    ((1, 4, 4, 16), (1, 12, 12, 16), True)
    """
    h_axis = 1 if layout == "NHWC" else 2
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D {layout} array, got shape {x.shape}")
    (h, w), (oh, ow) = x.shape[h_axis:h_axis + 2], _hw(size)
    if (h, w) == (oh, ow):
        return x
    if oh <= h and ow <= w:
        return area_resize(x, (oh, ow), layout)
    if oh >= h and ow >= w:
        return bicubic_resize(x, (oh, ow), layout)
    raise ValueError(f"mixed resize {h}x{w} -> {oh}x{ow} (one axis grows, one shrinks) is not supported")
