"""Our Flax MMDiT equals diffusers' SD3Transformer2DModel (all three variants), with feature taps."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swd_jax.convert.converted import load_diffusers
from swd_jax.convert.transformer import convert_state_dict
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from tests.torch_reference import VARIANTS, rel_err, sd3_inputs, tiny_sd3_config, tiny_sd3_transformer

TOL = 1e-5  # fp32 relative, max-abs error over max-abs value


def run_ours(cfg, params, inputs, feature_blocks=(), features_only=False):
    x, t, c, p = inputs
    out = MMDiT(cfg).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                           jnp.asarray(c), jnp.asarray(p), feature_blocks=feature_blocks,
                           features_only=features_only)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers_at_several_sizes(variant, tmp_path):
    model = tiny_sd3_transformer(variant)
    model.save_pretrained(tmp_path)  # through safetensors + config.json, as a user's checkpoint
    cfg, params = load_diffusers(str(tmp_path))
    assert cfg == MMDiTConfig.from_dict(tiny_sd3_config(variant))
    from tests.torch_reference import torch_forward
    for latent in (8, 12):
        inputs = sd3_inputs(tiny_sd3_config(variant), batch=3, latent=latent)
        ref_v, ref_feats = torch_forward(model, inputs, hook_blocks=(0, 1))
        v, feats = run_ours(cfg, params, inputs, feature_blocks=(0, 1))
        assert rel_err(np.asarray(v).transpose(0, 3, 1, 2), ref_v) < TOL, (variant, latent)
        for i, f in zip((0, 1), feats):
            assert rel_err(f, ref_feats[i]) < TOL, (variant, latent, i)


def test_features_only_stops_early_and_equals_full_run():
    model = tiny_sd3_transformer("sd35_medium")
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium"))
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    inputs = sd3_inputs(tiny_sd3_config("sd35_medium"), batch=2, latent=8)
    (f1,) = run_ours(cfg, params, inputs, feature_blocks=(1,), features_only=True)
    _, (f_full,) = run_ours(cfg, params, inputs, feature_blocks=(1,))
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f_full))
    # Early exit: the compiled program for features_only has no work of the last block.
    x, t, c, p = (jnp.asarray(a) for a in inputs)
    x = x.transpose(0, 2, 3, 1)
    fwd = lambda prm, fo: MMDiT(cfg).apply({"params": prm}, x, t, c, p, feature_blocks=(0,), features_only=fo)
    flops_feat = jax.jit(lambda prm: fwd(prm, True)).lower(params).compile().cost_analysis()["flops"]
    flops_full = jax.jit(lambda prm: fwd(prm, False)).lower(params).compile().cost_analysis()["flops"]
    assert flops_feat < 0.5 * flops_full


def test_remat_policies_give_the_same_values_and_gradients():
    """remat off, "full" and "dots" change what is kept for the backward, not the numbers (fp32, 1e-6)."""
    model = tiny_sd3_transformer("sd35_medium")
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium"))
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    x, t, c, p = (jnp.asarray(a) for a in sd3_inputs(tiny_sd3_config("sd35_medium"), batch=2, latent=8))
    x = x.transpose(0, 2, 3, 1)

    def value_and_grads(**kw):
        loss = lambda prm, x: (MMDiT(cfg, **kw).apply({"params": prm}, x, t, c, p) ** 2).mean()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v0, (gp0, gx0)) = value_and_grads(remat=False)
    for policy, plain in (("full", 0), ("dots", 0), ("full", 1)):  # plain: blocks_without_remat (the last ones)
        v, (gp, gx) = value_and_grads(remat=True, remat_policy=policy, blocks_without_remat=plain)
        assert abs(float(v) - float(v0)) <= 1e-6 * abs(float(v0))
        assert rel_err(np.asarray(gx), np.asarray(gx0)) < 1e-6
        flat, flat0 = jax.tree.leaves(gp), jax.tree.leaves(gp0)
        assert max(rel_err(np.asarray(a), np.asarray(b)) for a, b in zip(flat, flat0)) < 1e-6
    with pytest.raises(ValueError, match="blocks_without_remat=9: expected 0..3"):
        value_and_grads(remat=True, blocks_without_remat=9)
    with pytest.raises(ValueError, match="remat_policy='some'; expected one of"):
        value_and_grads(remat=True, remat_policy="some")
    with pytest.raises(ValueError, match="remat_policy='attention' keeps the splash kernel's residuals; "
                                         "attention_impl is 'xla'"):  # tests/test_splash.py runs it with splash
        value_and_grads(remat=True, remat_policy="attention")


def test_bad_inputs_name_the_problem(tmp_path):
    model = tiny_sd3_transformer("sd3_medium", num_layers=2)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd3_medium", 2))
    missing = dict(sd)
    missing.pop("transformer_blocks.0.attn.to_k.weight")
    with pytest.raises(ValueError, match=r"missing weights.*transformer_blocks_0/attn/to_k/kernel"):
        convert_state_dict(missing, cfg)
    extra = dict(sd, **{"transformer_blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unknown keys.*transformer_blocks\.0\.attn\.extra\.weight"):
        convert_state_dict(extra, cfg)
    wrong = dict(sd, **{"proj_out.bias": np.zeros((5,), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatches: proj_out\.bias"):
        convert_state_dict(wrong, cfg)
    with pytest.raises(ValueError, match=r"unsupported .* config fields: \['use_pos_embed_v2'\]"):
        MMDiTConfig.from_dict(dict(tiny_sd3_config("sd3_medium"), use_pos_embed_v2=True))
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        MMDiTConfig.from_dict(dict(tiny_sd3_config("sd3_medium"), qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="expected an 'SD3Transformer2DModel'"):
        MMDiTConfig.from_dict(dict(tiny_sd3_config("sd3_medium"), _class_name="FluxTransformer2DModel"))
    params = convert_state_dict(sd, cfg)
    too_big = sd3_inputs(tiny_sd3_config("sd3_medium"), batch=1, latent=34)
    with pytest.raises(ValueError, match="exceeds the position-embedding grid"):
        run_ours(cfg, params, too_big)
    (tmp_path / "config.json").write_text(json.dumps(tiny_sd3_config("sd3_medium")))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers(str(tmp_path))


def test_chunked_attention_matches_torch_values_and_gradients():
    """The memory-saving "chunked" attention (query chunks, rematerialised) equals torch SDPA, with gradients."""
    import torch
    from swd_jax.models import layers
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (37, 41, 41))
    w = rng.standard_normal((2, 37, 3, 8)).astype(np.float32)
    loss = lambda q, k, v: (layers.chunked_attention(q, k, v, chunk=8) * w).sum()
    ours, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    ref = (out * torch.tensor(w)).sum()
    ref.backward()
    assert abs(float(ours) - ref.item()) < 1e-4 * abs(ref.item()) + 1e-5
    for g, t in zip(grads, (tq, tk, tv)):
        assert rel_err(np.asarray(g), t.grad.numpy().transpose(0, 2, 1, 3)) < TOL
    # The whole model with chunked attention (chunks smaller than the sequence) still equals diffusers.
    model = tiny_sd3_transformer("sd35_medium")
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium"))
    params = convert_state_dict({kk: vv.numpy() for kk, vv in model.state_dict().items()}, cfg)
    inputs = sd3_inputs(tiny_sd3_config("sd35_medium"), batch=2, latent=12)
    from tests.torch_reference import torch_forward
    ref_v, _ = torch_forward(model, inputs)
    x, t, c, p = inputs
    chunked = MMDiT(cfg, attention_impl="chunked", attention_chunk=16)
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), jnp.asarray(p))
    got = chunked.apply({"params": params}, *args)
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), ref_v) < TOL
    # 43 tokens in chunks of 16: the attention really runs as a loop over query chunks.
    assert "stablehlo.while" in jax.jit(lambda *a: chunked.apply({"params": params}, *a)).lower(*args).as_text()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        layers.dot_product_attention(q, k, v, "flash")
