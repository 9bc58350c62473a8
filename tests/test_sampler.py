"""Scale-wise sampler with our MMDiT equals an independent torch loop with diffusers' SD3 model (METHOD.md s.3).

The torch loop is written here from the spec, NCHW: v = G(x, 1000 sigma_i) (CFG as two separate forwards,
v_u + g (v_c - v_u)), x0 = x - sigma_i v, `interpolate(mode="bicubic", align_corners=False)` to the next scale,
re-noise x = sigma_{i+1} eps + (1 - sigma_{i+1}) x0. Both sides get the same initial and per-step noise.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swd_jax.convert.transformer import convert_state_dict
from swd_jax.method import sampler
from swd_jax.method.sampler import SamplerNoise, scale_wise_sample
from swd_jax.method.schedule import ScaleSchedule
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from tests.torch_reference import rel_err, sd3_inputs, tiny_sd3_config, tiny_sd3_transformer

TOL = 1e-5  # fp32 relative, max-abs error over max-abs value
B = 2
VARIANT = "sd35_medium"
# Three scales with non-integer upscale ratios (8 -> 12 -> 16) on the 28-step shift-3 grid: sigmas 1, .8959, .7371, 0.
SCHEDULE = ScaleSchedule(scales=(8, 12, 16), boundaries=(0, 7, 14, 28))


class MMDiTVelocity:
    """velocity_fn(params, x_BHWC, t_B, cond) -> v_BHWC with our MMDiT; counts traces (= compiled programs)."""

    def __init__(self, cfg: MMDiTConfig):
        self.model, self.traces = MMDiT(cfg), 0

    def __call__(self, params, x_BHWC, t_B, cond):
        self.traces += 1
        return self.model.apply({"params": params}, x_BHWC, t_B, cond["context"], cond["pooled"])


@pytest.fixture(scope="module")
def setup():
    """One tiny diffusers model, its converted params, cond/uncond, noise, and ONE velocity_fn object."""
    model = tiny_sd3_transformer(VARIANT)
    cfg_dict = tiny_sd3_config(VARIANT)
    cfg = MMDiTConfig.from_dict(cfg_dict)
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    _, _, ctx_c, pooled_c = sd3_inputs(cfg_dict, batch=B, latent=8, seed=1)
    _, _, ctx_u, pooled_u = sd3_inputs(cfg_dict, batch=B, latent=8, seed=2)
    cond, uncond = {"context": ctx_c, "pooled": pooled_c}, {"context": ctx_u, "pooled": pooled_u}
    rng = np.random.default_rng(3)
    draw = lambda s: rng.standard_normal((B, s, s, cfg.in_channels), dtype=np.float32)
    noise = SamplerNoise(init_BHWC=draw(SCHEDULE.scales[0]), steps=tuple(draw(s) for s in SCHEDULE.scales[1:]))
    return model, MMDiTVelocity(cfg), params, cond, uncond, noise


def torch_scale_wise(model, cond, uncond, scales, sigmas, timesteps, noise, guidance):
    """METHOD.md s.3 in torch with diffusers' SD3Transformer2DModel, NCHW; returns the final x0 as NHWC."""
    nchw = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous()
    g = lambda c: dict(encoder_hidden_states=torch.from_numpy(c["context"]),
                       pooled_projections=torch.from_numpy(c["pooled"]))
    x = nchw(noise.init_BHWC)
    with torch.no_grad():
        for i in range(len(scales)):
            t = torch.full((x.shape[0],), float(timesteps[i]), dtype=torch.float32)
            v = model(hidden_states=x, timestep=t, **g(cond)).sample
            if guidance > 1.0:
                v_u = model(hidden_states=x, timestep=t, **g(uncond)).sample
                v = v_u + guidance * (v - v_u)
            x0 = x - float(sigmas[i]) * v
            if i == len(scales) - 1:
                x = x0
                break
            if scales[i + 1] != scales[i]:
                x0 = F.interpolate(x0, size=(scales[i + 1], scales[i + 1]), mode="bicubic", align_corners=False)
            s_next = float(sigmas[i + 1])
            x = s_next * nchw(noise.steps[i]) + (1.0 - s_next) * x0
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_mmdit_scale_wise_matches_diffusers_loop_and_compiles_once_per_scale(setup, guidance):
    model, vel, params, cond, uncond, noise = setup
    run = lambda: scale_wise_sample(vel, params, cond, None, SCHEDULE, batch_size=B, channels=4, uncond=uncond,
                                    guidance_scale=guidance, noise=noise)
    traces_before, programs_before = vel.traces, sampler._scale_step._cache_size()
    out = run()
    assert out.shape == (B, 16, 16, 4)
    ref = torch_scale_wise(model, cond, uncond, SCHEDULE.scales, SCHEDULE.sampling_sigmas,
                           SCHEDULE.sampling_timesteps, noise, guidance)
    err = rel_err(out, ref)
    assert err < TOL, (guidance, err)
    # One compiled program per scale (8->12, 12->16, 16 last); a second call neither retraces nor recompiles.
    k = len(SCHEDULE.scales)
    assert (vel.traces - traces_before, sampler._scale_step._cache_size() - programs_before) == (k, k)
    out2 = run()
    assert (vel.traces - traces_before, sampler._scale_step._cache_size() - programs_before) == (k, k), \
        "second call recompiled"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


def test_schedule_sigmas_are_the_grid_values():
    """The sigmas the comparison runs on are the 28-step shift-3 grid at indices 0, 7, 14, then 0."""
    np.testing.assert_allclose(SCHEDULE.sampling_sigmas, [1.0, 0.8959, 0.7371, 0.0], atol=1e-4)
    np.testing.assert_array_equal(SCHEDULE.sampling_timesteps, SCHEDULE.sampling_sigmas[:-1] * np.float32(1000))
    assert SCHEDULE.sampling_timesteps.dtype == np.float32
