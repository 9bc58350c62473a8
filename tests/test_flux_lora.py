"""FLUX + LoRA: PEFT adapters on diffusers' FLUX == our Flux with the `lora` collection; the PEFT round trip is
exact; our scale-wise sampler (FLUX-SwD schedule, guidance through the embedding) == a torch loop over diffusers.

The torch loop is written from METHOD.md s.3 as FluxPipeline calls the model: packed latents, timestep / 1000,
guidance scale per example; x0 = x - sigma_i v, `interpolate(mode="bicubic", align_corners=False)` to the next
scale, re-noise x = sigma_{i+1} eps + (1 - sigma_{i+1}) x0, the same noise on both sides.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swd_jax.convert.flux import convert_state_dict
from swd_jax.convert.peft_lora import export_peft, import_lora, init_lora, lora_modules
from swd_jax.method.sampler import SamplerNoise, flux_velocity, scale_wise_sample
from swd_jax.method.schedule import get_schedule
from swd_jax.models.flux import Flux, FluxConfig
from swd_jax.models.layers import LoraConfig
from tests.flux_reference import flux_inputs, tiny_flux_config, tiny_flux_transformer, torch_flux_forward
from tests.torch_reference import rel_err

TOL = 1e-5  # fp32 relative, max-abs error over max-abs value
CFG = FluxConfig.from_dict(tiny_flux_config(True))
# Every kind of Linear FLUX has: both attentions, both MLPs, single-block MLP and output, adaLN (`linear`), the
# time/guidance/text embedders (`linear_1`), x_embedder and proj_out (PEFT's "proj_out" matches the top-level one
# too). The guidance embedder sees 1000 g: it agrees only because layers.timestep_frequencies reproduces torch's exp.
LORA = LoraConfig(rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out", "net.0.proj", "net.2", "proj_mlp",
                                              "proj_out", "linear", "linear_1", "x_embedder"))
BLOCKS = (1, 3)
N_MODULES = 2 * (8 + 4 + 2) + 2 * (5 + 1) + 1 + 3 + 1 + 1  # double, single blocks; norm_out, linear_1 x3, x_emb, proj


@pytest.fixture(scope="module")
def base():
    model = tiny_flux_transformer(True)
    return model, convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, CFG)


@pytest.fixture(scope="module")
def our_adapter(tmp_path_factory):
    """Our fresh LoRA with a trained-looking B, exported as a PEFT folder."""
    lora = init_lora(CFG, LORA, jax.random.key(0))
    rng = np.random.default_rng(1)
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)) if path[-1].key == "lora_B"
        else x, lora)
    folder = str(tmp_path_factory.mktemp("flux_lora"))
    export_peft(lora, LORA, folder, cfg=CFG)
    return lora, folder


def test_round_trip_exact_and_peft_matches_ours(base, our_adapter):
    from peft import PeftModel
    model, params = base
    lora, folder = our_adapter
    assert len(lora_modules(CFG, LORA)) == N_MODULES
    cfg_back, back = import_lora(folder, CFG)
    assert (cfg_back.rank, cfg_back.alpha, set(cfg_back.targets)) == (LORA.rank, LORA.alpha, set(LORA.targets))
    jax.tree.map(np.testing.assert_array_equal, back, lora)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    torch_model = peft_model.base_model.model
    assert sum("lora_A" in n for n, _ in torch_model.named_parameters()) == N_MODULES
    for h, w in ((8, 8), (10, 14)):
        x, sigma, c, p, g = inputs = flux_inputs(tiny_flux_config(True), batch=2, height=h, width=w, seed=h)
        t = sigma * np.float32(1000)
        ref_v, ref_feats = torch_flux_forward(torch_model, *inputs, hook_blocks=BLOCKS)
        v, feats = Flux(CFG, lora=cfg_back).apply({"params": params, "lora": back}, x, t, c, p, g,
                                                  feature_blocks=BLOCKS)
        assert rel_err(v, ref_v) < TOL, (h, w, rel_err(v, ref_v))
        for i, f in zip(BLOCKS, feats):
            assert rel_err(f, ref_feats[i]) < TOL, (h, w, i)
        v0 = Flux(CFG).apply({"params": params}, x, t, c, p, g)
        assert rel_err(v, v0) > 0.05  # the adapter matters


def torch_scale_wise(model, cond, scales, sigmas, noise):
    """METHOD.md s.3 with diffusers' FLUX as FluxPipeline calls it; NHWC in and out."""
    nhwc = lambda a: torch.from_numpy(np.asarray(a))
    x = nhwc(noise.init_BHWC)
    for i in range(len(scales)):
        sigma_B = np.full((x.shape[0],), sigmas[i], np.float32)  # ours: timestep float32(sigma) * 1000
        v, _ = torch_flux_forward(model, x.numpy(), sigma_B, cond["context"], cond["pooled"], cond["guidance"])
        x0 = x - float(sigmas[i]) * torch.from_numpy(v)
        if i == len(scales) - 1:
            return x0.numpy()
        x0 = x0.permute(0, 3, 1, 2)
        if scales[i + 1] != scales[i]:
            x0 = F.interpolate(x0, size=(scales[i + 1],) * 2, mode="bicubic", align_corners=False)
        x = float(sigmas[i + 1]) * nhwc(noise.steps[i]) + (1.0 - float(sigmas[i + 1])) * x0.permute(0, 2, 3, 1)


def test_scale_wise_sample_with_lora_matches_torch_loop(base, our_adapter):
    from peft import PeftModel
    model, params = base
    lora, folder = our_adapter
    torch_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval().base_model.model
    sigmas = get_schedule("flux_4").sampling_sigmas  # the published FLUX-SwD sigmas 1, .8956, .7363, .6007, 0
    scales = (8, 10, 12, 16)  # tiny stand-ins for 64 80 96 128, same ratios' kind (non-integer upscales)
    B = 2
    _, _, ctx, pooled, _ = flux_inputs(tiny_flux_config(True), batch=B, height=8, width=8, seed=7)
    cond = {"context": ctx, "pooled": pooled, "guidance": np.array([4.5, 3.0], np.float32)}
    rng = np.random.default_rng(3)
    draw = lambda s: rng.standard_normal((B, s, s, CFG.latent_channels), dtype=np.float32)
    noise = SamplerNoise(init_BHWC=draw(scales[0]), steps=tuple(draw(s) for s in scales[1:]))
    vel = flux_velocity(Flux(CFG, lora=LORA))
    out = scale_wise_sample(vel, {"params": params, "lora": lora}, cond, None, (scales, sigmas), batch_size=B,
                            channels=CFG.latent_channels, noise=noise)
    assert out.shape == (B, 16, 16, CFG.latent_channels)
    ref = torch_scale_wise(torch_model, cond, scales, sigmas, noise)
    assert rel_err(out, ref) < TOL, rel_err(out, ref)
