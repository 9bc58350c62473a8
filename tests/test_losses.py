"""Losses and discriminator head vs independent PyTorch implementations: values and input gradients, fp32."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swd_jax.method.discriminator import DiscriminatorHead, head_widths
from swd_jax.method.losses import (dmd_loss, fake_model_loss, gan_discriminator_loss, gan_generator_loss, pdm_linear,
                            pdm_loss, pdm_rbf)

RTOL, ATOL = 1e-5, 1e-6


def _t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=True)


def _close(jax_val, torch_val, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(jax_val), torch_val.detach().numpy(), rtol=rtol, atol=atol)


# ---- independent torch references (written from METHOD.md s.5 and the reference's semantics) ----
def torch_pdm_linear(fake, real, c, batch):
    if batch:
        fake, real = fake.reshape(1, -1, fake.shape[-1]), real.reshape(1, -1, real.shape[-1])
    d = (fake.mean(1) - real.mean(1)).pow(2)  # [B, D]
    return (torch.sqrt(d + c * c) - c).mean()  # pseudo-Huber per feature, mean over batch and features


def torch_pdm_rbf(fake, real, bw, batch):
    if batch:
        fake, real = fake.reshape(1, -1, fake.shape[-1]), real.reshape(1, -1, real.shape[-1])
    n = fake.shape[1]

    def k(a, b):  # pairwise |a_i - b_j|^2 by broadcasting
        return torch.exp(-((a[:, :, None] - b[:, None]) ** 2).sum(-1) / (2 * bw ** 2))

    off = 1 - torch.eye(n)
    mmd = ((k(fake, fake) * off).sum((1, 2)) / (n * (n - 1)) + (k(real, real) * off).sum((1, 2)) / (n * (n - 1))
           - 2 * k(fake, real).mean((1, 2)))
    return mmd.mean()


def torch_dmd(x, x0_t, x0_f):
    with torch.no_grad():
        p_real, p_fake = x - x0_t, x - x0_f
        g = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))
    target = (x - g).detach()
    return 0.5 * ((x - target) ** 2).mean()


# ---- PDM ----
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 4, 6), (2, 1, 8)])
@pytest.mark.parametrize("batch", [False, True])
def test_pdm_linear_value_and_grad(shape, batch):
    rng = np.random.default_rng(hash((shape, batch)) % 2**32)
    fake, real = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    val, (gf, gr) = jax.value_and_grad(lambda a, b: pdm_linear(a, b, per_sample=not batch), (0, 1))(fake, real)
    tf, tr = _t(fake), _t(real)
    ref = torch_pdm_linear(tf, tr, 1e-3, batch)
    ref.backward()
    _close(val, ref)
    _close(gf, tf.grad)
    _close(gr, tr.grad)


@pytest.mark.parametrize("shape,bw,mag", [((3, 6, 4), 2.0, 1.0), ((2, 5, 16), 100.0, 60.0), ((1, 2, 3), 1.0, 1.0)])
@pytest.mark.parametrize("batch", [False, True])
def test_pdm_rbf_value_and_grad(shape, bw, mag, batch):
    rng = np.random.default_rng(len(shape) + int(bw) + batch)
    fake = (mag * rng.standard_normal(shape)).astype(np.float32)
    real = (mag * rng.standard_normal(shape) + 0.5 * mag).astype(np.float32)
    loss = lambda a, b: pdm_loss(a, b, kernel="rbf", bandwidth=bw, per_sample=not batch)
    val, (gf, gr) = jax.value_and_grad(loss, (0, 1))(fake, real)
    tf, tr = _t(fake), _t(real)
    ref = torch_pdm_rbf(tf, tr, bw, batch)
    ref.backward()
    # The unbiased estimate cancels terms of size ~1: compare at the scale of those terms.
    _close(val, ref, atol=1e-6)
    scale = max(tf.grad.abs().max().item(), tr.grad.abs().max().item())
    _close(gf, tf.grad, atol=1e-5 * scale)
    _close(gr, tr.grad, atol=1e-5 * scale)


def test_pdm_identical_inputs_zero_and_errors():
    f = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 4)), jnp.float32)
    assert float(pdm_linear(f, f)) == 0.0
    # The unbiased RBF estimate of two identical sets is not 0 (cross term keeps its diagonal); as torch.
    tf = torch.tensor(np.asarray(f))
    _close(pdm_rbf(f, f, bandwidth=2.0), torch_pdm_rbf(tf, tf, 2.0, False))
    g = jax.grad(pdm_linear)(f, f)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) == 0.0
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pdm_rbf(f[:, :1], f[:, :1])
    with pytest.raises(ValueError, match="differ in shape"):
        pdm_linear(f, f[:, :3])
    with pytest.raises(ValueError, match="kernel"):
        pdm_loss(f, f, kernel="poly")


def test_pdm_linear_jit():
    f = jnp.ones((2, 3, 4))
    assert float(jax.jit(pdm_loss, static_argnames=("kernel", "per_sample"))(f, f + 1.0)) > 0


# ---- DMD ----
@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 6, 6, 16)])
def test_dmd_value_and_grad(shape):
    rng = np.random.default_rng(sum(shape))
    x, x0_t, x0_f = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    val, grads = jax.value_and_grad(dmd_loss, (0, 1, 2))(x, x0_t, x0_f)
    tx = _t(x)
    ref = torch_dmd(tx, torch.from_numpy(x0_t), torch.from_numpy(x0_f))
    ref.backward()
    _close(val, ref)
    _close(grads[0], tx.grad, atol=1e-8)
    assert float(jnp.abs(grads[1]).max()) == 0.0 and float(jnp.abs(grads[2]).max()) == 0.0
    # d loss / d x_fake = g / numel
    p_real, p_fake = x - x0_t, x - x0_f
    g = (p_real - p_fake) / np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(grads[0]), g / g.size, rtol=1e-5, atol=1e-9)


def test_dmd_zero_p_real():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
    x0_t = x.copy()
    x0_t[1] += 1.0  # sample 0 has p_real = 0 = p_fake (0/0 -> NaN -> 0)
    x0_f = x0_t.copy()
    x0_f[1] += 0.5
    val, g = jax.value_and_grad(dmd_loss)(x, x0_t, x0_f)
    ref = torch_dmd(torch.from_numpy(x), torch.from_numpy(x0_t), torch.from_numpy(x0_f))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    _close(val, ref)
    assert float(jnp.abs(g[0]).max()) == 0.0


def test_dmd_shape_error():
    with pytest.raises(ValueError, match="differ in shape"):
        dmd_loss(jnp.ones((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1)), jnp.ones((1, 2, 3, 1)))


# ---- GAN and fake-model losses ----
def test_gan_losses_value_and_grad():
    rng = np.random.default_rng(4)
    fakes = [rng.standard_normal(5).astype(np.float32) * 3 for _ in range(2)]
    reals = [rng.standard_normal(5).astype(np.float32) * 3 for _ in range(2)]
    val, (gf, gr) = jax.value_and_grad(gan_discriminator_loss, (0, 1))(fakes, reals)
    tf, tr = [_t(a) for a in fakes], [_t(a) for a in reals]
    ref = F.softplus((tf[0] + tf[1]) / 2).mean() + F.softplus(-(tr[0] + tr[1]) / 2).mean()
    ref.backward()
    _close(val, ref)
    for a, b in zip(gf + gr, tf + tr):
        _close(a, b.grad)
    val, g = jax.value_and_grad(gan_generator_loss)(fakes[0])
    t = _t(fakes[0])
    ref = F.softplus(-t).mean()
    ref.backward()
    _close(val, ref)
    _close(g, t.grad)
    _close(gan_generator_loss([fakes[0]]), ref)


def test_fake_model_loss():
    rng = np.random.default_rng(5)
    pred, target = (rng.standard_normal((2, 3, 3, 4)).astype(np.float32) for _ in range(2))
    val, (gp, gt) = jax.value_and_grad(fake_model_loss, (0, 1))(pred, target)
    tp = _t(pred)
    ref = F.mse_loss(tp, torch.from_numpy(target))
    ref.backward()
    _close(val, ref)
    _close(gp, tp.grad)
    assert float(jnp.abs(gt).max()) == 0.0


# ---- discriminator head ----
@pytest.mark.parametrize("width", [1536, 2432, 24, 7])
def test_head_widths_match_torch_linspace(width):
    assert head_widths(width) == tuple(torch.linspace(width, 1, 5, dtype=int).tolist())


def _torch_head(width):
    widths = head_widths(width)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(*[
        torch.nn.Sequential(torch.nn.LayerNorm(widths[j]), torch.nn.GELU(), torch.nn.Linear(widths[j], widths[j + 1]))
        for j in range(4)])
    with torch.no_grad():  # non-trivial LayerNorm affine
        for j in range(4):
            ref[j][0].weight.normal_(1.0, 0.3)
            ref[j][0].bias.normal_(0.0, 0.3)
    params = {}
    for j in range(4):
        params[f"norm_{j}"] = {"scale": jnp.asarray(ref[j][0].weight.detach().numpy()),
                               "bias": jnp.asarray(ref[j][0].bias.detach().numpy())}
        params[f"dense_{j}"] = {"kernel": jnp.asarray(ref[j][2].weight.detach().numpy().T),
                                "bias": jnp.asarray(ref[j][2].bias.detach().numpy())}
    return ref, params


def test_discriminator_head_matches_torch():
    width, rng = 24, np.random.default_rng(6)
    ref, params = _torch_head(width)
    head = DiscriminatorHead(width=width)
    feats = [rng.standard_normal((3, 5, width)).astype(np.float32) * 2 for _ in range(2)]
    init = nn.meta.unbox(jax.eval_shape(head.init, jax.random.key(0), feats[0])["params"])
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    apply = jax.jit(lambda fs: head.apply({"params": params}, fs))

    logits, g = apply(feats), jax.jit(jax.grad(lambda fs: apply(fs).sum()))(feats)
    tfe = [_t(f) for f in feats]
    tlog = sum(ref(f.mean(dim=1)) for f in tfe) / 2  # reference gan_loss_fn: shared head, averaged logits
    tlog.sum().backward()
    assert logits.shape == (3,)
    _close(logits, tlog[:, 0])
    for a, b in zip(g, tfe):
        _close(a, b.grad)
    _close(apply(feats[0]), ref(tfe[0].mean(dim=1))[:, 0])
    with pytest.raises(ValueError, match=r"\[B, L, 24\]"):
        apply(feats[0][..., :5])


def test_discriminator_logical_axes():
    boxed = jax.eval_shape(DiscriminatorHead(width=24).init, jax.random.key(0), jnp.ones((1, 2, 24)))["params"]
    axes = nn.get_partition_spec(boxed)
    assert tuple(axes["dense_0"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["dense_3"]["kernel"]) == ("embed", None)
    assert tuple(axes["norm_0"]["scale"]) == ("embed",)
