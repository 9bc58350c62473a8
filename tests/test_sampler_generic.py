"""Scale-wise and Euler samplers with a tiny analytic velocity vs an independent torch loop, and compile caching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swd_jax.method.sampler import SamplerNoise, euler_sample, scale_wise_sample
from swd_jax.method.schedule import ScaleSchedule, flow_match_sigmas

B, C = 2, 3
SCHEDULE = ScaleSchedule(scales=(8, 12, 16, 16), boundaries=(0, 7, 14, 18, 28))  # non-integer ratio + equal pair


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": (0.5 * rng.standard_normal((C, C))).astype(np.float32),
            "b": rng.standard_normal(C).astype(np.float32)}


def _cond(seed):
    return {"c": np.random.default_rng(seed).standard_normal((B, C)).astype(np.float32)}


class CountingVelocity:
    """v = tanh(x W + (t/1000) b) + c, counting how often it is traced (= compiled)."""

    def __init__(self):
        self.traces = 0

    def __call__(self, params, x_BHWC, t_B, cond):
        self.traces += 1
        h = jnp.einsum("bhwc,cd->bhwd", x_BHWC, params["w"], precision=jax.lax.Precision.HIGHEST)
        return jnp.tanh(h + (t_B / 1000.0)[:, None, None, None] * params["b"]) + cond["c"][:, None, None, :]


def torch_velocity(params, x_BCHW, t_B, cond):
    h = torch.einsum("bchw,cd->bdhw", x_BCHW, torch.from_numpy(params["w"]))
    v = torch.tanh(h + (t_B / 1000.0)[:, None, None, None] * torch.from_numpy(params["b"])[None, :, None, None])
    return v + torch.from_numpy(cond["c"])[:, :, None, None]


def torch_scale_wise(params, cond, uncond, scales, sigmas, timesteps, noise, guidance):
    """The reference's do_scales loop, NCHW: x0 = x - sigma v; bicubic up if the size changes; re-noise."""
    x = torch.tensor(np.asarray(noise.init_BHWC)).permute(0, 3, 1, 2)
    for i in range(len(scales)):
        t = torch.full((B,), float(timesteps[i]))
        v = torch_velocity(params, x, t, cond)
        if guidance > 1.0:
            v_u = torch_velocity(params, x, t, uncond)
            v = v_u + guidance * (v - v_u)
        x = x - float(sigmas[i]) * v
        if i == len(scales) - 1:
            break
        if scales[i] != scales[i + 1]:
            x = F.interpolate(x, size=scales[i + 1], mode="bicubic")
        eps = torch.tensor(np.asarray(noise.steps[i])).permute(0, 3, 1, 2)
        x = float(sigmas[i + 1]) * eps + (1.0 - float(sigmas[i + 1])) * x
    return x.permute(0, 2, 3, 1).numpy()


def _noise(scales, seed=1):
    rng = np.random.default_rng(seed)
    draw = lambda s: rng.standard_normal((B, s, s, C)).astype(np.float32)
    return SamplerNoise(init_BHWC=draw(scales[0]), steps=tuple(draw(s) for s in scales[1:]))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_scale_wise_matches_torch_and_caches(guidance):
    vel, params, cond, uncond = CountingVelocity(), _params(), _cond(2), _cond(3)
    noise = _noise(SCHEDULE.scales)
    run = lambda: scale_wise_sample(vel, params, cond, None, SCHEDULE, batch_size=B, channels=C,
                                    uncond=uncond, guidance_scale=guidance, noise=noise)
    out = run()
    assert out.shape == (B, 16, 16, C)
    ref = torch_scale_wise(params, cond, uncond, SCHEDULE.scales, SCHEDULE.sampling_sigmas,
                           SCHEDULE.sampling_timesteps, noise, guidance)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # One program per step shape: (8->12), (12->16), (16->16), (16, last).
    assert vel.traces == 4
    out2 = run()
    assert vel.traces == 4, "second call recompiled"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


def test_key_noise_convention_and_tuple_schedule():
    vel, params, cond = CountingVelocity(), _params(), _cond(4)
    scales, sigmas = (8, 12, 16), (1.0, 0.8, 0.5, 0.0)
    key = jax.random.key(7)
    out = scale_wise_sample(vel, params, cond, key, (scales, sigmas), batch_size=B, channels=C)
    draw = lambda i, s: jax.random.normal(jax.random.fold_in(key, i), (B, s, s, C))
    noise = SamplerNoise(draw(0, 8), (draw(1, 12), draw(2, 16)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        scale_wise_sample(vel, params, cond, None, (scales, sigmas), batch_size=B, channels=C, noise=noise)))
    ref = torch_scale_wise(params, cond, None, scales, np.float32(sigmas), np.float32(sigmas[:-1]) * 1000,
                           noise, 1.0)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_sampler_errors():
    vel, params, cond = CountingVelocity(), _params(), _cond(0)
    with pytest.raises(ValueError, match="uncond"):
        scale_wise_sample(vel, params, cond, jax.random.key(0), SCHEDULE, batch_size=B, channels=C,
                          guidance_scale=2.0)
    with pytest.raises(ValueError, match="noise shapes"):
        scale_wise_sample(vel, params, cond, None, SCHEDULE, batch_size=B, channels=C, noise=_noise((8, 12, 16)))
    with pytest.raises(ValueError, match="key"):
        scale_wise_sample(vel, params, cond, None, SCHEDULE, batch_size=B, channels=C)
    with pytest.raises(ValueError, match="len\\(sigmas\\)"):
        scale_wise_sample(vel, params, cond, None, ((8, 16), (1.0, 0.0)), batch_size=B, channels=C)


def test_euler_matches_torch_one_compile():
    vel, params, cond, uncond = CountingVelocity(), _params(1), _cond(5), _cond(6)
    sigmas = flow_match_sigmas(6, 3.0)
    x_init = np.random.default_rng(8).standard_normal((B, 8, 8, C)).astype(np.float32)
    out = euler_sample(vel, params, x_init, sigmas, cond, uncond=uncond, guidance_scale=2.5)
    assert vel.traces == 1
    x = torch.from_numpy(x_init).permute(0, 3, 1, 2)
    for i in range(6):
        t = torch.full((B,), float(sigmas[i]) * 1000.0)
        v_c, v_u = torch_velocity(params, x, t, cond), torch_velocity(params, x, t, uncond)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * (v_u + 2.5 * (v_c - v_u))
    np.testing.assert_allclose(np.asarray(out), x.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
