"""Flow-matching grid vs diffusers itself, the METHOD.md sigma table, ScaleSchedule logic and validation."""
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from swd_jax.method.schedule import (PRESETS, ScaleSchedule, add_noise, flow_match_sigmas, flow_match_timesteps,
                              get_schedule)


@pytest.mark.parametrize("num_steps,shift", [(28, 3.0), (4, 1.0), (50, 3.0), (20, 2.5), (1, 3.0)])
def test_grid_equals_diffusers(num_steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    sigmas, timesteps = flow_match_sigmas(num_steps, shift), flow_match_timesteps(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0.0 and sigmas.dtype == np.float32
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps, sched.timesteps.numpy(), rtol=1e-6, atol=0)
    # In fact bit-identical.
    assert np.array_equal(sigmas, sched.sigmas.numpy()) and np.array_equal(timesteps, sched.timesteps.numpy())


def test_method_table_numbers():
    s = flow_match_sigmas(28, 3.0)
    expected = {0: 1.0, 4: 0.9454, 7: 0.8959, 12: 0.7904, 14: 0.7371, 18: 0.6022, 27: 0.0089}
    for idx, val in expected.items():
        assert abs(s[idx] - val) < 5e-5, (idx, s[idx], val)
    assert abs(s[27] - 0.008929) < 1e-6 and s[28] == 0.0


def test_add_noise_per_example_sigma():
    x0 = jnp.ones((3, 2, 2, 4))
    eps = jnp.full((3, 2, 2, 4), 3.0)
    out = add_noise(x0, eps, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(add_noise(x0, eps, 0.25)), 1.5)
    with pytest.raises(ValueError, match="batch"):
        add_noise(x0, eps, jnp.array([0.1, 0.2]))


def test_presets_sampling_sigmas():
    m4, m6, l4, flux = (get_schedule(n) for n in ("sd35_medium_4", "sd35_medium_6", "sd35_large_4", "flux_4"))
    np.testing.assert_allclose(m4.sampling_sigmas, [1.0, 0.8959, 0.7371, 0.6022, 0.0], atol=5e-5)
    np.testing.assert_allclose(m6.sampling_sigmas, [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022, 0.0], atol=5e-5)
    np.testing.assert_array_equal(l4.sampling_sigmas, m4.sampling_sigmas)
    np.testing.assert_allclose(flux.sampling_sigmas, [1.0, 0.8956, 0.7363, 0.6007, 0.0], atol=1e-7)
    np.testing.assert_allclose(flux.sampling_timesteps, [1000.0, 895.6, 736.3, 600.7], rtol=1e-6)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    np.testing.assert_array_equal(m4.boundary_timesteps, sched.timesteps.numpy()[[0, 7, 14, 18]])
    np.testing.assert_array_equal(m4.sampling_timesteps, m4.boundary_timesteps)
    np.testing.assert_array_equal(m4.boundary_sigmas, sched.sigmas.numpy()[[0, 7, 14, 18, 28]])
    assert m4.sigmas.shape == (29,) and m4.boundary_sigmas[-1] == 0.0
    with pytest.raises(ValueError, match="explicit_sigmas"):
        flux.start_index(0)
    with pytest.raises(ValueError, match="known"):
        get_schedule("sd4")
    assert set(PRESETS) == {"sd35_medium_4", "sd35_medium_6", "sd35_large_4", "flux_4"}


def test_interval_logic():
    s = get_schedule("sd35_medium_4")
    assert [s.interval(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [s.start_index(k) for k in range(4)] == [0, 7, 14, 18]
    assert [s.end_index(k) for k in range(4)] == [7, 14, 18, 28]
    assert [s.scale(k) for k in range(4)] == [64, 80, 96, 128]
    assert [s.prev_scale(k) for k in range(4)] == [64, 64, 80, 96]
    assert s.num_intervals == 4
    with pytest.raises(ValueError, match="out of range"):
        s.scale(4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scales=(64, 80), boundaries=(0, 28)), "len\\(boundaries\\)"),
    (dict(scales=(80, 64), boundaries=(0, 7, 28)), "non-decreasing"),
    (dict(scales=(63, 80), boundaries=(0, 7, 28)), "patch_size"),
    (dict(scales=(64, 80), boundaries=(0, 7, 7)), "end at num_train_steps"),
    (dict(scales=(64, 80, 96), boundaries=(0, 14, 7, 28)), "strictly increasing"),
    (dict(scales=(64, 80), boundaries=(1, 7, 28)), "start at 0"),
    (dict(scales=(64, 80), boundaries=(0, 30, 28)), "lie in"),
    (dict(scales=(64, 80)), "exactly one"),
    (dict(scales=(64, 80), explicit_sigmas=(1.0, 0.5, 0.1)), "end at 0"),
    (dict(scales=(64, 80), explicit_sigmas=(0.5, 1.0, 0.0)), "strictly decreasing"),
    (dict(scales=(), boundaries=(0,)), "empty"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaleSchedule(**kwargs)


def test_equal_scales_allowed():
    s = ScaleSchedule(scales=(64, 64, 128), boundaries=(0, 7, 14, 28))
    assert s.prev_scale(1) == 64
