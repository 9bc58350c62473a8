"""SwD losses (METHOD.md s.5; reference: yandex-research/swd `src/losses.py`). Pure, jit/grad friendly, fp32.

Where the reference code and METHOD.md read differently, the code wins; the differences are noted per
function:
- PDM linear kernel: the pseudo-Huber is applied to every feature of the squared mean difference and the
  result is averaged over batch AND features (`mmd.mean()` over a [B, D] array), not summed over D.
- GAN with several feature blocks: the logits are averaged over blocks first, then softplus.
- The fake-model target and the whole DMD target are constants (the reference computes them under
  `no_grad` / `.detach()`), so both use stop_gradient.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
Logits = jnp.ndarray | Sequence[jnp.ndarray]


def _check_feats(feat_fake_BLD: jnp.ndarray, feat_real_BLD: jnp.ndarray):
    if feat_fake_BLD.ndim != 3 or feat_real_BLD.ndim != 3:
        raise ValueError(f"PDM features must be [B, L, D], got {feat_fake_BLD.shape} and {feat_real_BLD.shape}")
    if feat_fake_BLD.shape != feat_real_BLD.shape:
        raise ValueError(f"fake and real features differ in shape: {feat_fake_BLD.shape} vs {feat_real_BLD.shape}")


def _as_one_set(f_BLD: jnp.ndarray) -> jnp.ndarray:
    """[B, L, D] -> [1, B*L, D]: all tokens of the batch as one set (the reference's `do_batch_mmd`)."""
    return f_BLD.reshape(1, -1, f_BLD.shape[-1])


def pdm_linear(feat_fake_BLD: jnp.ndarray, feat_real_BLD: jnp.ndarray, c: float = 1e-3,
               per_sample: bool = True, eps: float = 1e-5) -> jnp.ndarray:
    """Linear-kernel PDM: mean_{b,d} [ max(sqrt((mu_fake - mu_real)_{bd}^2 + c^2), eps) - c ], mu = token mean.

    With per_sample=False all tokens of the batch form one set (a single mean per feature).
    The eps clamp is the reference's (only active when c = 0). Any input dtype; computed and returned in float32.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import pdm_linear
    >>> fake, real = jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 3))   # token means differ by 1 in every feature
    >>> round(float(pdm_linear(fake, real)), 4)                 # sqrt(1 + c^2) - c
    0.999
    >>> round(float(pdm_linear(real, real)), 6)                 # equal feature sets
    0.0
    >>> pdm_linear(fake.astype(jnp.bfloat16), real.astype(jnp.bfloat16)).dtype
    dtype('float32')
    """
    _check_feats(feat_fake_BLD, feat_real_BLD)
    x, y = feat_fake_BLD.astype(jnp.float32), feat_real_BLD.astype(jnp.float32)
    if not per_sample:
        x, y = _as_one_set(x), _as_one_set(y)
    d_BD = (x.mean(axis=1) - y.mean(axis=1)) ** 2
    return jnp.mean(jnp.maximum(jnp.sqrt(d_BD + c * c), eps) - c)


def pdm_rbf(feat_fake_BLD: jnp.ndarray, feat_real_BLD: jnp.ndarray, bandwidth: float = 100.0,
            per_sample: bool = True) -> jnp.ndarray:
    """RBF-kernel PDM: unbiased MMD^2 per set, k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)), mean over sets.

    MMD^2 = (sum K_xx - n) / (n(n-1)) + (sum K_yy - n) / (n(n-1)) - 2 sum K_xy / n^2 with n tokens per set
    (the diagonal is removed as n ones, as in the reference). per_sample=False: the batch is one set.
    Needs n >= 2; float32 result for any input dtype. Being unbiased, it is not 0 for two equal sets
    (the cross term keeps its diagonal): for x = y it is -2 (n - sum K_xx / n) / (n (n - 1)) <= 0.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import pdm_rbf
    >>> fake = jnp.array([[[0.0], [1.0]]]); real = fake + 1.0      # [B=1, L=2, D=1]
    >>> round(float(pdm_rbf(fake, real, bandwidth=1.0)), 4)       # 2 e^-1/2 - (1 + 2 e^-1/2 + e^-2) / 2
    0.0389
    >>> round(float(pdm_rbf(fake, fake, bandwidth=1.0)), 4)       # unbiased: NOT 0 for equal sets
    -0.3935
    """
    _check_feats(feat_fake_BLD, feat_real_BLD)
    x, y = feat_fake_BLD.astype(jnp.float32), feat_real_BLD.astype(jnp.float32)
    if not per_sample:
        x, y = _as_one_set(x), _as_one_set(y)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"unbiased RBF MMD needs at least 2 tokens per set, got {n}")
    alpha = 1.0 / (2.0 * bandwidth ** 2)
    xx = jnp.einsum("bid,bjd->bij", x, x, precision=_HI)
    yy = jnp.einsum("bid,bjd->bij", y, y, precision=_HI)
    xy = jnp.einsum("bid,bjd->bij", x, y, precision=_HI)
    rx = jnp.diagonal(xx, axis1=1, axis2=2)
    ry = jnp.diagonal(yy, axis1=1, axis2=2)
    k_xx = jnp.exp(-alpha * (rx[:, :, None] + rx[:, None, :] - 2.0 * xx))
    k_yy = jnp.exp(-alpha * (ry[:, :, None] + ry[:, None, :] - 2.0 * yy))
    k_xy = jnp.exp(-alpha * (rx[:, :, None] + ry[:, None, :] - 2.0 * xy))
    mmd_B = ((k_xx.sum(axis=(1, 2)) - n) / (n * (n - 1)) + (k_yy.sum(axis=(1, 2)) - n) / (n * (n - 1))
             - 2.0 * k_xy.sum(axis=(1, 2)) / (n * n))
    return jnp.mean(mmd_B)


def pdm_loss(feat_fake_BLD: jnp.ndarray, feat_real_BLD: jnp.ndarray, kernel: str = "linear",
             per_sample: bool = True, c: float = 1e-3, bandwidth: float = 100.0) -> jnp.ndarray:
    """Patch distribution matching between fake and real token features [B, L, D]: `pdm_linear` or `pdm_rbf`.

    The generator's PDM term (METHOD.md s.5 step 4); float32 scalar; an unknown kernel raises ValueError.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import pdm_loss
    >>> fake, real = jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 3))
    >>> round(float(pdm_loss(fake, real, kernel="linear", c=0.0)), 4)
    1.0
    >>> round(float(pdm_loss(fake, real, kernel="rbf", bandwidth=1.0, per_sample=False)), 4)   # 2 - 2 e^-3/2
    1.5537
    """
    if kernel == "linear":
        return pdm_linear(feat_fake_BLD, feat_real_BLD, c=c, per_sample=per_sample)
    if kernel == "rbf":
        return pdm_rbf(feat_fake_BLD, feat_real_BLD, bandwidth=bandwidth, per_sample=per_sample)
    raise ValueError(f"unknown PDM kernel {kernel!r}; use 'linear' or 'rbf'")


def dmd_grad(x_fake: jnp.ndarray, x0_teacher: jnp.ndarray, x0_fake: jnp.ndarray) -> jnp.ndarray:
    """DMD direction g = (p_real - p_fake) / mean|p_real|, p_real = x - x0_T, p_fake = x - x0_F; NaN -> 0.

    The mean is per example over all non-batch axes, without eps (as the reference); a zero denominator
    gives inf/NaN, which nan_to_num maps to the largest finite float / 0 (torch.nan_to_num semantics).
    Returns float32 of the input shape.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import dmd_grad
    >>> x = jnp.zeros((1, 2, 2, 1))
    >>> x0_teacher = jnp.array([1.0, -1.0, 2.0, 0.0]).reshape(1, 2, 2, 1)   # mean|x - x0_T| = 1
    >>> dmd_grad(x, x0_teacher, x0_fake=jnp.zeros_like(x)).ravel().tolist()
    [-1.0, 1.0, -2.0, 0.0]
    """
    x = x_fake.astype(jnp.float32)
    p_real = x - x0_teacher.astype(jnp.float32)
    p_fake = x - x0_fake.astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    g = (p_real - p_fake) / jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True)
    return jnp.nan_to_num(g)


def dmd_loss(x_fake: jnp.ndarray, x0_teacher: jnp.ndarray, x0_fake: jnp.ndarray) -> jnp.ndarray:
    """Distribution matching loss 0.5 * mean((x_fake - sg(x_fake - g))^2); d loss / d x_fake = g / numel.

    g is `dmd_grad` (treated as a constant: x0_teacher and x0_fake get no gradient). The value is
    0.5 * mean(g^2); the mean runs over all elements (batch included); float32 for any input dtype.

    >>> import jax, jax.numpy as jnp
    >>> from swd_jax.method.losses import dmd_loss
    >>> x = jnp.zeros((1, 2, 2, 1))
    >>> x0_teacher = jnp.array([1.0, -1.0, 2.0, 0.0]).reshape(1, 2, 2, 1)
    >>> round(float(dmd_loss(x, x0_teacher, jnp.zeros_like(x))), 4)   # 0.5 * (1 + 1 + 4 + 0) / 4
    0.75
    >>> jax.grad(dmd_loss)(x, x0_teacher, jnp.zeros_like(x)).ravel().tolist()   # g / numel
    [-0.25, 0.25, -0.5, 0.0]
    """
    if not x_fake.shape == x0_teacher.shape == x0_fake.shape:
        raise ValueError(f"DMD inputs differ in shape: {x_fake.shape}, {x0_teacher.shape}, {x0_fake.shape}")
    x = x_fake.astype(jnp.float32)
    target = jax.lax.stop_gradient(x - dmd_grad(x_fake, x0_teacher, x0_fake))
    return 0.5 * jnp.mean((x - target) ** 2)


def _mean_logits(logits: Logits) -> jnp.ndarray:
    """Average the logits of several feature blocks (a list), or pass one array through; as float32."""
    if isinstance(logits, (list, tuple)):
        if not logits:
            raise ValueError("empty list of logits")
        return sum(l.astype(jnp.float32) for l in logits) / len(logits)
    return logits.astype(jnp.float32)


def gan_discriminator_loss(logits_fake: Logits, logits_real: Logits) -> jnp.ndarray:
    """Discriminator (fake-model) GAN loss mean softplus(D_fake) + mean softplus(-D_real).

    A list of per-block logits is averaged over blocks before the softplus (reference `gan_loss_fn`).
    Increasing in the fake logits, decreasing in the real ones; float32 for any input dtype.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import gan_discriminator_loss
    >>> round(float(gan_discriminator_loss(jnp.zeros(4), jnp.zeros(4))), 4)   # 2 log 2
    1.3863
    >>> round(float(gan_discriminator_loss([jnp.full(4, -3.0), jnp.full(4, 1.0)], jnp.full(4, 5.0))), 4)
    0.32
    """
    return (jnp.mean(jax.nn.softplus(_mean_logits(logits_fake)))
            + jnp.mean(jax.nn.softplus(-_mean_logits(logits_real))))


def gan_generator_loss(logits_fake: Logits) -> jnp.ndarray:
    """Generator GAN loss mean softplus(-D_fake) (non-saturating); lists of logits averaged first.

    Decreasing in the fake logits; float32 for any input dtype (bf16 logits give a float32 loss).

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.losses import gan_generator_loss
    >>> round(float(gan_generator_loss(jnp.zeros(3))), 4)   # log 2
    0.6931
    >>> gan_generator_loss(jnp.ones(3, jnp.bfloat16)).dtype
    dtype('float32')
    """
    return jnp.mean(jax.nn.softplus(-_mean_logits(logits_fake)))


def fake_model_loss(x0_pred: jnp.ndarray, x0_target: jnp.ndarray) -> jnp.ndarray:
    """Fake score model's denoising loss MSE(x0_pred, sg(x0_target)) in x0 form, fp32, mean over all elements.

    >>> import jax, jax.numpy as jnp
    >>> from swd_jax.method.losses import fake_model_loss
    >>> pred, target = jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 1.0]])
    >>> round(float(fake_model_loss(pred, target)), 4)          # (1 + 4) / 2
    2.5
    >>> jax.grad(fake_model_loss, argnums=1)(pred, target).tolist()   # the target is a constant
    [[0.0, 0.0]]
    """
    if x0_pred.shape != x0_target.shape:
        raise ValueError(f"x0_pred {x0_pred.shape} and x0_target {x0_target.shape} differ in shape")
    target = jax.lax.stop_gradient(x0_target.astype(jnp.float32))
    return jnp.mean((x0_pred.astype(jnp.float32) - target) ** 2)
