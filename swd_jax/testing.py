"""NumPy reference implementations of the SwD method's functions, and `assert_matches_reference`.

Written from METHOD.md and the semantics of the official PyTorch code (yandex-research/swd: `src/losses.py`
`mmd_loss_`, `gan_loss_fn`, `generator_loss`, `fake_diffusion_loss`; `src/flow_matching_sampler.py`;
diffusers' `FlowMatchEulerDiscreteScheduler`; torch `F.interpolate`), in the plainest form: direct pairwise
distances, explicit bins and kernel taps, float64 arithmetic. No jax, no torch: import it in any test suite.

Every reference has the name and signature of the swd_jax function it checks (swd_jax.method.losses, .schedule,
.resize, .sampler), takes NumPy arrays (anything `np.asarray` accepts) and returns float64 NumPy values
(flow_match_sigmas / flow_match_timesteps: the float32 values diffusers returns). The samplers need explicit
`noise` (a NumPy reference cannot reproduce jax.random) and call your velocity function with NumPy arrays.

>>> import numpy as np
>>> from swd_jax import testing
>>> def my_gan_generator_loss(logits_fake):       # your own implementation, under the reference's name
...     return np.mean(np.log1p(np.exp(-np.asarray(logits_fake, np.float64))))
>>> my_gan_generator_loss.__name__ = "gan_generator_loss"
>>> testing.assert_matches_reference(my_gan_generator_loss, np.array([-1.0, 0.0, 2.0]))
>>> testing.assert_matches_reference(lambda x: 2 * x, np.ones(3), reference=testing.gan_generator_loss)
Traceback (most recent call last):
...
AssertionError: <lambda> vs reference gan_generator_loss: shapes differ: (3,) vs ()
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

_REFERENCE_NAMES = ("pdm_linear", "pdm_rbf", "pdm_loss", "dmd_grad", "dmd_loss", "gan_discriminator_loss",
                    "gan_generator_loss", "fake_model_loss", "flow_match_sigmas", "flow_match_timesteps",
                    "add_noise", "area_resize", "bicubic_resize", "resize", "scale_wise_sample", "euler_sample")
__all__ = [*_REFERENCE_NAMES, "assert_matches_reference", "REFERENCES"]


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


# ---- losses (METHOD.md s.5; reference src/losses.py) ----
def _one_set(x_BLD: np.ndarray) -> np.ndarray:
    return x_BLD.reshape(1, -1, x_BLD.shape[-1])


def pdm_linear(feat_fake_BLD, feat_real_BLD, c: float = 1e-3, per_sample: bool = True, eps: float = 1e-5):
    """mean over (set, feature) of max(sqrt((mean_tokens fake - mean_tokens real)^2 + c^2), eps) - c."""
    x, y = _f64(feat_fake_BLD), _f64(feat_real_BLD)
    if not per_sample:
        x, y = _one_set(x), _one_set(y)
    d = (x.mean(axis=1) - y.mean(axis=1)) ** 2
    return np.mean(np.maximum(np.sqrt(d + c ** 2), eps) - c)


def pdm_rbf(feat_fake_BLD, feat_real_BLD, bandwidth: float = 100.0, per_sample: bool = True):
    """Unbiased MMD^2, k(a, b) = exp(-|a - b|^2 / (2 bw^2)), per set (within-set diagonals dropped), mean over sets."""
    x, y = _f64(feat_fake_BLD), _f64(feat_real_BLD)
    if not per_sample:
        x, y = _one_set(x), _one_set(y)
    n = x.shape[1]

    def k(a, b):  # [S, n, n] from pairwise squared distances
        return np.exp(-((a[:, :, None, :] - b[:, None, :, :]) ** 2).sum(-1) / (2.0 * bandwidth ** 2))

    off = 1.0 - np.eye(n)
    mmd = ((k(x, x) * off).sum((1, 2)) / (n * (n - 1)) + (k(y, y) * off).sum((1, 2)) / (n * (n - 1))
           - 2.0 * k(x, y).mean((1, 2)))
    return np.mean(mmd)


def pdm_loss(feat_fake_BLD, feat_real_BLD, kernel: str = "linear", per_sample: bool = True, c: float = 1e-3,
             bandwidth: float = 100.0):
    """`pdm_linear` or `pdm_rbf` (the reference's `mmd_loss_`)."""
    if kernel == "linear":
        return pdm_linear(feat_fake_BLD, feat_real_BLD, c=c, per_sample=per_sample)
    if kernel == "rbf":
        return pdm_rbf(feat_fake_BLD, feat_real_BLD, bandwidth=bandwidth, per_sample=per_sample)
    raise ValueError(f"unknown PDM kernel {kernel!r}")


def dmd_grad(x_fake, x0_teacher, x0_fake):
    """g = nan_to_num(((x - x0_T) - (x - x0_F)) / mean_{non-batch}|x - x0_T|); +-inf -> +-float32 max."""
    x = _f64(x_fake)
    p_real, p_fake = x - _f64(x0_teacher), x - _f64(x0_fake)
    denom = np.abs(p_real).mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    big = float(np.finfo(np.float32).max)  # torch.nan_to_num on the reference's float32 tensors
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num((p_real - p_fake) / denom, nan=0.0, posinf=big, neginf=-big)


def dmd_loss(x_fake, x0_teacher, x0_fake):
    """0.5 * MSE(x, x - g) = 0.5 * mean(g^2) over all elements."""
    return 0.5 * np.mean(dmd_grad(x_fake, x0_teacher, x0_fake) ** 2)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _logits(logits) -> np.ndarray:
    if isinstance(logits, (list, tuple)):
        return sum(_f64(l) for l in logits) / len(logits)
    return _f64(logits)


def gan_discriminator_loss(logits_fake, logits_real):
    """mean softplus(D_fake) + mean softplus(-D_real); per-block logit lists averaged first (`gan_loss_fn`)."""
    return np.mean(_softplus(_logits(logits_fake))) + np.mean(_softplus(-_logits(logits_real)))


def gan_generator_loss(logits_fake):
    """mean softplus(-D_fake); per-block logit lists averaged first."""
    return np.mean(_softplus(-_logits(logits_fake)))


def fake_model_loss(x0_pred, x0_target):
    """mean((x0_pred - x0_target)^2) over all elements."""
    return np.mean((_f64(x0_pred) - _f64(x0_target)) ** 2)


# ---- schedule (METHOD.md s.1; diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(n)) ----
def flow_match_sigmas(num_steps: int, shift: float):
    """diffusers' sigmas: the float32 training table's ends, float64 linspace and shift, cast to float32, then 0."""
    n_train = 1000
    table = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
    table = np.float32(shift) * table / (np.float32(1) + np.float32(shift - 1) * table)  # float32, as __init__
    t = np.linspace(float(table[0]) * n_train, float(table[-1]) * n_train, num_steps)
    s = t / n_train
    s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])


def flow_match_timesteps(num_steps: int, shift: float):
    """sigmas[:-1] * 1000 in float32."""
    return flow_match_sigmas(num_steps, shift)[:-1] * np.float32(1000)


def add_noise(x0, eps, sigma):
    """sigma * eps + (1 - sigma) * x0, sigma a scalar or one value per example."""
    x0, eps, sigma = _f64(x0), _f64(eps), _f64(sigma)
    if sigma.ndim == 1:
        sigma = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    return sigma * eps + (1.0 - sigma) * x0


# ---- resize (torch F.interpolate, align_corners=False) ----
def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def _per_axis(x: np.ndarray, size, layout: str, one_axis: Callable) -> np.ndarray:
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    h_axis = 1 if layout == "NHWC" else 2
    for axis, out in zip((h_axis, h_axis + 1), _hw(size)):
        x = np.moveaxis(one_axis(np.moveaxis(x, axis, 0), out), 0, axis)
    return x


def _area_1d(x: np.ndarray, out: int) -> np.ndarray:
    n = x.shape[0]  # output i averages rows floor(i n / out) .. ceil((i + 1) n / out) - 1 (adaptive avg pool)
    return np.stack([x[(i * n) // out: -((-(i + 1) * n) // out)].mean(axis=0) for i in range(out)])


def _keys(d: np.ndarray, a: float = -0.75) -> np.ndarray:
    d = np.abs(d)
    near = (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    far = a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _bicubic_1d(x: np.ndarray, out: int) -> np.ndarray:
    n = x.shape[0]
    src = (np.arange(out) + 0.5) * n / out - 0.5  # not clamped for cubic (torch)
    base = np.floor(src)
    y = 0.0
    for off in (-1, 0, 1, 2):
        idx = np.clip(base + off, 0, n - 1).astype(int)
        w = _keys(src - (base + off)).reshape((out,) + (1,) * (x.ndim - 1))
        y = y + w * x[idx]
    return y


def area_resize(x, size, layout: str = "NHWC"):
    """torch interpolate(mode="area") (adaptive average pooling) of the two spatial axes."""
    return _per_axis(_f64(x), size, layout, _area_1d)


def bicubic_resize(x, size, layout: str = "NHWC"):
    """torch interpolate(mode="bicubic", align_corners=False): Keys a = -0.75, 4 taps, borders clamped."""
    return _per_axis(_f64(x), size, layout, _bicubic_1d)


def resize(x, size, layout: str = "NHWC"):
    """Area when shrinking, bicubic when growing, identity when equal."""
    x = _f64(x)
    h_axis = 1 if layout == "NHWC" else 2
    (h, w), (oh, ow) = x.shape[h_axis:h_axis + 2], _hw(size)
    if (h, w) == (oh, ow):
        return x
    return (area_resize if oh <= h and ow <= w else bicubic_resize)(x, (oh, ow), layout)


# ---- samplers (METHOD.md s.3; reference FlowMatchingSolver.sampling) ----
def _velocity(velocity_fn, params, x, sigma, cond, uncond, guidance_scale):
    t = np.full((x.shape[0],), np.float32(sigma) * np.float32(1000), np.float32)
    v = _f64(velocity_fn(params, x.astype(np.float32), t, cond))
    if guidance_scale > 1.0:  # the reference runs cond and uncond as two calls
        v_u = _f64(velocity_fn(params, x.astype(np.float32), t, uncond))
        v = v_u + guidance_scale * (v - v_u)
    return v


def scale_wise_sample(velocity_fn, params, cond, key, schedule, *, batch_size: int, channels: int = 16,
                      uncond=None, guidance_scale: float = 1.0, noise=None):
    """K steps: x0 = x - sigma_i v; then bicubic-up x0 to the next scale and re-noise with noise.steps[i].

    `schedule`: a ScaleSchedule (its scales and sampling_sigmas) or (scales, sigmas); `key` is ignored and
    `noise` (init_BHWC, steps) is required.
    """
    if noise is None:
        raise ValueError("the NumPy reference needs explicit `noise` (it cannot draw jax.random noise)")
    if hasattr(schedule, "sampling_sigmas"):
        scales, sigmas = schedule.scales, np.asarray(schedule.sampling_sigmas, np.float32)
    else:
        scales, sigmas = schedule[0], np.asarray(schedule[1], np.float32)
    x = _f64(noise.init_BHWC)
    for i in range(len(scales)):
        x0 = x - float(sigmas[i]) * _velocity(velocity_fn, params, x, sigmas[i], cond, uncond, guidance_scale)
        if i == len(scales) - 1:
            return x0
        if scales[i + 1] != scales[i]:
            x0 = bicubic_resize(x0, scales[i + 1])
        x = float(sigmas[i + 1]) * _f64(noise.steps[i]) + (1.0 - float(sigmas[i + 1])) * x0


def euler_sample(velocity_fn, params, x_init_BHWC, sigmas, cond, *, timesteps=None, uncond=None,
                 guidance_scale: float = 1.0):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, 1000 sigma_i); returns x at sigmas[-1]."""
    if timesteps is not None:
        raise ValueError("the NumPy reference uses timesteps = 1000 * float32(sigma)")
    sigmas = np.asarray(sigmas, np.float32)
    x = _f64(x_init_BHWC)
    for i in range(len(sigmas) - 1):
        v = _velocity(velocity_fn, params, x, sigmas[i], cond, uncond, guidance_scale)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    return x


REFERENCES: dict[str, Callable] = {name: globals()[name] for name in _REFERENCE_NAMES}


# ---- the check ----
def _to_numpy(tree):
    """Arrays (jax or numpy) -> numpy; lists, tuples and dicts recursively; anything else as is."""
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_to_numpy(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if hasattr(tree, "__array__") and not isinstance(tree, np.ndarray):
        return np.asarray(tree)
    return tree


def _leaves(tree) -> list:
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in _leaves(t)]
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves(tree[k])]
    return [tree]


def assert_matches_reference(fn: Callable, *args: Any, reference: Callable | None = None, rtol: float = 1e-5,
                             atol: float = 1e-6, **kwargs: Any) -> None:
    """Run `fn(*args, **kwargs)` and the reference of the same name (or `reference`) and assert they match.

    Match: same shapes, and |actual - expected| <= atol + rtol |expected| elementwise (NaNs must coincide).
    On failure the AssertionError names the largest difference: where, both values, absolute and relative.
    The reference gets NumPy copies of the arguments (jax arrays converted).
    """
    name = getattr(fn, "__name__", repr(fn))
    if reference is None:
        if name not in REFERENCES:
            raise ValueError(f"no reference named {name!r}; give reference=..., or one of {sorted(REFERENCES)}")
        reference = REFERENCES[name]
    ref_name = getattr(reference, "__name__", repr(reference))
    actual, expected = fn(*args, **kwargs), reference(*_to_numpy(args), **_to_numpy(kwargs))
    got, want = _leaves(actual), _leaves(expected)
    where = f"{name} vs reference {ref_name}"
    if len(got) != len(want):
        raise AssertionError(f"{where}: {len(got)} outputs vs {len(want)}")
    for k, (a, e) in enumerate(zip(got, want)):
        a, e = np.asarray(a).astype(np.float64), np.asarray(e).astype(np.float64)
        part = where if len(got) == 1 else f"{where}, output {k}"
        if a.shape != e.shape:
            raise AssertionError(f"{part}: shapes differ: {a.shape} vs {e.shape}")
        if not np.array_equal(np.isnan(a), np.isnan(e)):
            raise AssertionError(f"{part}: NaNs differ: {int(np.isnan(a).sum())} vs {int(np.isnan(e).sum())}")
        diff = np.where(np.isnan(a), 0.0, np.abs(a - e))
        excess = diff - (atol + rtol * np.abs(np.nan_to_num(e)))
        if a.size and np.max(excess) > 0:
            i = np.unravel_index(int(np.argmax(excess)), a.shape) if a.ndim else ()
            rel = diff[i] / abs(e[i]) if e[i] != 0 else math.inf
            raise AssertionError(
                f"{part}: {int((excess > 0).sum())} of {a.size} elements differ beyond rtol={rtol}, atol={atol}; "
                f"largest difference at index {tuple(int(j) for j in i)}: got {a[i]!r}, reference {e[i]!r}, "
                f"|diff| {diff[i]:.3g}, relative {rel:.3g}")

