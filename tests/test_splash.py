"""The TPU splash attention path (Pallas kernel in interpret mode on CPU) equals torch SDPA and diffusers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from swd_jax.train import sharding
from swd_jax.convert.transformer import convert_state_dict
from swd_jax.models import layers, splash
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
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


def test_splash_off_tpu_is_refused():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="attention_impl='splash' needs a TPU.*'chunked'"):
        layers.dot_product_attention(q, q, q, "splash")
