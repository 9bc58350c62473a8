"""Our Flax FLUX equals diffusers' FluxTransformer2DModel (dev and schnell shapes), converter strict, feature taps."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swd_jax.convert.converted import load_diffusers
from swd_jax.convert.flux import convert_state_dict
from swd_jax.models.flux import Flux, FluxConfig, rope_tables
from tests.flux_reference import flux_inputs, tiny_flux_config, tiny_flux_transformer, torch_flux_forward
from tests.torch_reference import rel_err

TOL = 1e-5  # fp32 relative, max-abs error over max-abs value


def run_ours(cfg, variables, inputs, **kw):
    x, sigma, c, p, g = inputs
    return Flux(cfg, **kw.pop("model_kw", {})).apply(
        variables, jnp.asarray(x), jnp.asarray(sigma * np.float32(1000)), jnp.asarray(c), jnp.asarray(p),
        None if g is None else jnp.asarray(g), **kw)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers_at_two_sizes(guidance_embeds, tmp_path):
    model = tiny_flux_transformer(guidance_embeds)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded safetensors + index, as the real FLUX folders
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    cfg, params = load_diffusers(str(tmp_path))
    assert cfg == FluxConfig.from_dict(tiny_flux_config(guidance_embeds))
    hooks = (1, 2, 3)  # last double block, both single blocks
    for h, w in ((8, 8), (12, 16)):
        inputs = flux_inputs(tiny_flux_config(guidance_embeds), batch=3, height=h, width=w)
        ref_v, ref_feats = torch_flux_forward(model, *inputs, hook_blocks=hooks)
        v, feats = run_ours(cfg, {"params": params}, inputs, feature_blocks=hooks)
        assert v.shape == inputs[0].shape
        assert rel_err(v, ref_v) < TOL, (guidance_embeds, h, w, rel_err(v, ref_v))
        for i, f in zip(hooks, feats):
            assert rel_err(f, ref_feats[i]) < TOL, (guidance_embeds, h, w, i)


def test_rope_tables_equal_diffusers():
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from tests.flux_reference import image_ids
    cos, sin = rope_tables(7, 5, 6, (16, 56, 56))
    ref_cos, ref_sin = FluxPosEmbed(10000, [16, 56, 56])(torch.cat([torch.zeros(7, 3), image_ids(10, 12)]))
    np.testing.assert_array_equal(cos, ref_cos.numpy())
    np.testing.assert_array_equal(sin, ref_sin.numpy())


def test_features_only_stops_early_and_chunked_attention_agrees():
    model = tiny_flux_transformer(True)
    cfg = FluxConfig.from_dict(tiny_flux_config(True))
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    inputs = flux_inputs(tiny_flux_config(True), batch=2, height=8, width=8)
    (f1,) = run_ours(cfg, {"params": params}, inputs, feature_blocks=(1,), features_only=True)
    v, (f_full,) = run_ours(cfg, {"params": params}, inputs, feature_blocks=(1,))
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f_full))
    x, t, c, p, g = (jnp.asarray(a) for a in inputs)
    t = t * 1000
    fwd = lambda prm, fo: Flux(cfg).apply({"params": prm}, x, t, c, p, g, feature_blocks=(0,), features_only=fo)
    flops_feat = jax.jit(lambda prm: fwd(prm, True)).lower(params).compile().cost_analysis()["flops"]
    flops_full = jax.jit(lambda prm: fwd(prm, False)).lower(params).compile().cost_analysis()["flops"]
    assert flops_feat < 0.5 * flops_full
    # chunked attention (21 tokens in chunks of 8) and remat (the last, single-stream block without) give the
    # same velocity
    v2 = run_ours(cfg, {"params": params}, inputs, model_kw=dict(attention_impl="chunked", attention_chunk=8,
                                                                 remat=True, blocks_without_remat=1))
    assert rel_err(v2, v) < TOL


def test_bad_inputs_name_the_problem(tmp_path):
    model = tiny_flux_transformer(False, num_layers=1, num_single_layers=1)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = FluxConfig.from_dict(tiny_flux_config(False, 1, 1))
    missing = dict(sd)
    missing.pop("single_transformer_blocks.0.attn.norm_k.weight")
    with pytest.raises(ValueError, match=r"missing .*single_transformer_blocks_0/attn/norm_k/scale"):
        convert_state_dict(missing, cfg)
    extra = dict(sd, **{"transformer_blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.extra\.weight"):
        convert_state_dict(extra, cfg)
    with pytest.raises(ValueError, match=r"shape mismatches: proj_out\.bias"):
        convert_state_dict(dict(sd, **{"proj_out.bias": np.zeros((5,), np.float32)}), cfg)
    with pytest.raises(ValueError, match=r"time_text_embed/guidance_embedder"):  # a dev config, schnell weights
        convert_state_dict(sd, FluxConfig.from_dict(dict(tiny_flux_config(False, 1, 1), guidance_embeds=True)))
    with pytest.raises(ValueError, match=r"unsupported FluxTransformer2DModel config fields: \['foo'\]"):
        FluxConfig.from_dict(dict(tiny_flux_config(False), foo=1))
    with pytest.raises(ValueError, match="expected a 'FluxTransformer2DModel'"):
        FluxConfig.from_dict(dict(tiny_flux_config(False), _class_name="SD3Transformer2DModel"))
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        FluxConfig.from_dict(dict(tiny_flux_config(False), patch_size=2))
    params = convert_state_dict(sd, cfg)
    x, t, c, p, _ = flux_inputs(tiny_flux_config(False), batch=1, height=6, width=6)
    with pytest.raises(ValueError, match="guidance_B must be None"):
        run_ours(cfg, {"params": params}, (x, t, c, p, np.ones(1, np.float32)))
    with pytest.raises(ValueError, match="must be a positive even number"):
        run_ours(cfg, {"params": params}, (x[:, :5], t, c, p, None))
    dev = FluxConfig.from_dict(tiny_flux_config(True))
    with pytest.raises(ValueError, match="pass guidance_B"):
        Flux(dev).init(jax.random.key(0), jnp.asarray(x), t, c, p)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **tiny_flux_config(False)}))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers(str(tmp_path))


def test_verify_and_convert_clis_on_a_flux_pipeline(tmp_path):
    """`python -m swd_jax.cli.verify` / `swd_jax.convert` detect FLUX from `_class_name`; per-block errors localise."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from swd_jax.cli.convert import main as convert_main
    from swd_jax.convert.converted import load_converted
    from swd_jax.cli.verify import verify
    import torch
    model = tiny_flux_transformer(True)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_mlp"]))
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    folder, fast = str(tmp_path / "pipe"), dict(sizes=(8,), batch=2, text_tokens=5, verbose=False)
    res = verify(folder, lora=str(tmp_path / "adapter"), **fast)
    assert res["ok"] and len(res["errors"][8]) == 1 + 4, res

    def bump_single0(params):  # a change in the first single block (block 2) only
        params = jax.tree.map(lambda a: a, params)
        k = params["single_transformer_blocks_0"]["proj_mlp"]["kernel"]
        params["single_transformer_blocks_0"]["proj_mlp"]["kernel"] = k * 1.01
        return params
    errs = verify(folder, perturb=bump_single0, **fast)["errors"][8]
    assert max(errs["block 0"][1], errs["block 1"][1]) < TOL < min(errs["block 2"][1], errs["output"][1])
    dst = str(tmp_path / "converted")
    assert convert_main([folder, dst, "--dtype", "bfloat16", "--no-progress"]) == 0
    cfg, params = load_converted(dst)
    want_cfg, want = load_diffusers(str(tmp_path / "pipe" / "transformer"), dtype=jnp.bfloat16)
    assert cfg == want_cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)
