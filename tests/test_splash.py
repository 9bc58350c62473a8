"""The TPU splash attention path (Pallas kernel in interpret mode on CPU) equals torch SDPA and diffusers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from swd_jax.convert.transformer import convert_state_dict
from swd_jax.models import layers, splash
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from swd_jax.train import sharding
from tests.torch_reference import rel_err, sd3_inputs, tiny_sd3_config, tiny_sd3_transformer, torch_forward

TOL = 1e-5  # fp32 relative, as the other model tests


def _torch_attention(q, k, v, w):
    tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    (out * torch.tensor(w)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy().transpose(0, 2, 1, 3) for t in (tq, tk, tv)]


def test_splash_matches_torch_values_gradients_and_sharded(monkeypatch):
    monkeypatch.setattr(splash, "INTERPRET", True)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((8, n, 2, 16)).astype(np.float32) for n in (37, 41, 41))
    w = rng.standard_normal((8, 37, 2, 16)).astype(np.float32)
    ref, ref_grads = _torch_attention(q, k, v, w)
    out, grads = jax.value_and_grad(lambda *a: (splash.splash_attention(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(np.asarray(splash.splash_attention(q, k, v)), ref) < TOL
    for g, r in zip(grads, ref_grads):  # padding keys are masked: no gradient leaks into them
        assert rel_err(np.asarray(g), r) < TOL
    # Under a (2, 2, 2) mesh: shard_map over batch (data x fsdp) and heads (tensor), one kernel per device.
    mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
        sharded = jax.jit(splash.splash_attention)(q, k, v)
        lowered = jax.jit(splash.splash_attention).lower(q, k, v).as_text()
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    assert rel_err(np.asarray(sharded), ref) < TOL


def test_model_with_splash_matches_diffusers(monkeypatch):
    monkeypatch.setattr(splash, "INTERPRET", True)
    model = tiny_sd3_transformer("sd35_medium", num_layers=2)
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium", 2))
    params = convert_state_dict({kk: vv.numpy() for kk, vv in model.state_dict().items()}, cfg)
    inputs = sd3_inputs(tiny_sd3_config("sd35_medium", 2), batch=2, latent=8)
    ref_v, _ = torch_forward(model, inputs)
    x, t, c, p = inputs
    got = MMDiT(cfg, attention_impl="splash").apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                      jnp.asarray(t), jnp.asarray(c), jnp.asarray(p))
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), ref_v) < TOL


def test_fused_backward_matches_torch_and_keeps_bf16_error(monkeypatch):
    """attention_impl "splash_fused": the kernel's fused backward (dq in the dk/dv kernel). fp32: torch's gradients
    within TOL. bf16: dq's per-key-block partials are rounded to bf16 before their sum, so its error against an
    fp32 reference may grow, but stays within 2x that of the separate dq kernel (float32 accumulation)."""
    monkeypatch.setattr(splash, "INTERPRET", True)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, n, 2, 64)).astype(np.float32) for n in (300, 700, 700))  # 6 key blocks
    w = rng.standard_normal((2, 300, 2, 64)).astype(np.float32)
    _, ref_grads = _torch_attention(q, k, v, w)
    grads = lambda fused, dt: jax.grad(lambda *a: (splash.splash_attention(*a, fused_backward=fused)
                                                   .astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(
        *(jnp.asarray(a, dt) for a in (q, k, v)))
    for g, r in zip(grads(True, jnp.float32), ref_grads):
        assert rel_err(np.asarray(g), r) < TOL
    fused, separate = grads(True, jnp.bfloat16), grads(False, jnp.bfloat16)
    for f, sep, r in zip(fused, separate, ref_grads):
        e_fused, e_sep = rel_err(np.asarray(f, np.float32), r), rel_err(np.asarray(sep, np.float32), r)
        assert e_sep < 2e-2 and e_fused < 2 * e_sep, (e_fused, e_sep)


def test_attention_remat_policies_keep_values_and_gradients(monkeypatch):
    """remat policies "attention" and "dots_attention" (keep the kernel's output and log-sum-exp), with both
    backward kernels: the same loss and gradients as no remat (fp32, 1e-6)."""
    monkeypatch.setattr(splash, "INTERPRET", True)
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium", 2))
    model = tiny_sd3_transformer("sd35_medium", num_layers=2)
    params = convert_state_dict({kk: vv.numpy() for kk, vv in model.state_dict().items()}, cfg)
    x, t, c, p = (jnp.asarray(a) for a in sd3_inputs(tiny_sd3_config("sd35_medium", 2), batch=2, latent=8))
    x = x.transpose(0, 2, 3, 1)

    def value_and_grads(**kw):
        loss = lambda prm, x: (MMDiT(cfg, **kw).apply({"params": prm}, x, t, c, p) ** 2).mean()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    v0, (gp0, gx0) = value_and_grads(remat=False, attention_impl="splash")
    for impl, policy in (("splash", "attention"), ("splash_fused", "dots_attention")):
        v, (gp, gx) = value_and_grads(remat=True, remat_policy=policy, attention_impl=impl)
        assert abs(float(v) - float(v0)) <= 1e-6 * abs(float(v0))
        assert rel_err(np.asarray(gx), np.asarray(gx0)) < 1e-6
        assert max(rel_err(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp0))) < 1e-6


def test_splash_off_tpu_is_refused():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="attention_impl='splash' needs a TPU.*'chunked'"):
        layers.dot_product_attention(q, q, q, "splash")
