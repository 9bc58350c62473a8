"""swd_jax.testing: our functions match the NumPy references (beside the torch comparisons), and the check fails
loudly, naming the largest difference."""
import jax.numpy as jnp
import numpy as np
import pytest

from swd_jax import testing
from swd_jax.method import losses, resize, sampler, schedule
from swd_jax.testing import assert_matches_reference

RNG = np.random.default_rng(0)


def _n(*shape, scale=1.0, shift=0.0):
    return (scale * RNG.standard_normal(shape) + shift).astype(np.float32)


@pytest.mark.parametrize("per_sample", [True, False])
def test_pdm_matches_reference(per_sample):
    fake, real = _n(3, 6, 5), _n(3, 6, 5, shift=0.3)
    assert_matches_reference(losses.pdm_linear, fake, real, per_sample=per_sample)
    assert_matches_reference(losses.pdm_linear, fake, real, c=0.0, per_sample=per_sample)
    assert_matches_reference(losses.pdm_rbf, fake, real, bandwidth=2.0, per_sample=per_sample, rtol=1e-4, atol=1e-6)
    assert_matches_reference(losses.pdm_loss, 20 * fake, 20 * real, kernel="rbf", per_sample=per_sample,
                             rtol=1e-4, atol=1e-6)
    assert_matches_reference(losses.pdm_loss, jnp.asarray(fake, jnp.bfloat16), jnp.asarray(real, jnp.bfloat16),
                             per_sample=per_sample)


def test_dmd_and_fake_model_losses_match_reference():
    x, x0_t, x0_f = _n(2, 4, 4, 3), _n(2, 4, 4, 3), _n(2, 4, 4, 3)
    assert_matches_reference(losses.dmd_grad, x, x0_t, x0_f)
    assert_matches_reference(losses.dmd_loss, x, x0_t, x0_f)
    x0_t[1] = x[1]  # p_real = 0 for example 1: g = 0/0 -> 0 and x/0 -> the largest float32, in both
    assert_matches_reference(losses.dmd_grad, x, x0_t, x0_t)
    assert_matches_reference(losses.dmd_grad, x, x0_t, x0_f)
    assert_matches_reference(losses.fake_model_loss, x, x0_f)


def test_gan_losses_match_reference():
    fake, real = _n(8, scale=3.0), _n(8, scale=3.0)
    assert_matches_reference(losses.gan_discriminator_loss, fake, real)
    assert_matches_reference(losses.gan_discriminator_loss, [fake, real], [real, 2 * fake])
    assert_matches_reference(losses.gan_generator_loss, fake)
    assert_matches_reference(losses.gan_generator_loss, (fake, 40 * real))


@pytest.mark.parametrize("steps,shift", [(28, 3.0), (10, 1.0), (4, 2.5)])
def test_schedule_matches_reference_exactly(steps, shift):
    assert_matches_reference(schedule.flow_match_sigmas, steps, shift, rtol=0, atol=0)
    assert_matches_reference(schedule.flow_match_timesteps, steps, shift, rtol=0, atol=0)


def test_add_noise_matches_reference():
    x0, eps = _n(3, 2, 2, 4), _n(3, 2, 2, 4)
    assert_matches_reference(schedule.add_noise, x0, eps, np.float32(0.3))
    assert_matches_reference(schedule.add_noise, x0, eps, np.array([0.0, 0.5, 1.0], np.float32))


@pytest.mark.parametrize("fn,src,dst", [(resize.area_resize, 8, 4), (resize.area_resize, 8, 6),
                                        (resize.area_resize, 7, 3), (resize.bicubic_resize, 4, 8),
                                        (resize.bicubic_resize, 6, 8), (resize.bicubic_resize, 3, 7),
                                        (resize.resize, 8, 6), (resize.resize, 6, 8)])
def test_resizes_match_reference(fn, src, dst):
    x = _n(2, src, src + 1, 3)
    assert_matches_reference(fn, x, (dst, dst + 1), atol=2e-6)
    assert_matches_reference(fn, x.transpose(0, 3, 1, 2), dst, layout="NCHW", atol=2e-6)


def _linear_velocity(params, x, t, cond):  # a toy model that uses every input: v = a x + b t/1000 + cond
    return params["a"] * x + params["b"] * t[:, None, None, None] / 1000.0 + cond


def test_samplers_match_reference():
    params, cond, uncond = {"a": np.float32(0.7), "b": np.float32(-0.3)}, _n(2, 1, 1, 3), _n(2, 1, 1, 3)
    noise = sampler.SamplerNoise(_n(2, 4, 4, 3), (_n(2, 6, 6, 3), _n(2, 6, 6, 3), _n(2, 8, 8, 3)))
    sch = ((4, 6, 6, 8), (1.0, 0.8, 0.5, 0.3, 0.0))
    for g, unc in [(1.0, None), (3.0, uncond)]:
        assert_matches_reference(sampler.scale_wise_sample, _linear_velocity, params, cond, None, sch,
                                 batch_size=2, channels=3, noise=noise, uncond=unc, guidance_scale=g, atol=1e-5)
        assert_matches_reference(sampler.euler_sample, _linear_velocity, params, _n(2, 4, 4, 3),
                                 schedule.flow_match_sigmas(6, 3.0), cond, uncond=unc, guidance_scale=g, atol=1e-5)


def test_mismatch_names_the_largest_difference():
    def pdm_linear(a, b, **kw):  # a user's bug: the mean over features became a sum
        return losses.pdm_linear(a, b, **kw) * a.shape[-1]

    with pytest.raises(AssertionError, match=r"pdm_linear vs reference pdm_linear: 1 of 1 elements differ.*"
                                             r"largest difference at index \(\): got .*, reference .*relative 4"):
        assert_matches_reference(pdm_linear, _n(2, 3, 5), _n(2, 3, 5))
    with pytest.raises(AssertionError, match=r"largest difference at index \(1, 2, 0, 1\).*\|diff\| 1"):
        assert_matches_reference(lambda a, s: resize.area_resize(a, s).at[1, 2, 0, 1].add(1.0), _n(2, 6, 6, 2), 3,
                                 reference=testing.area_resize)

    def my_loss(x):
        return x
    with pytest.raises(ValueError, match="no reference named 'my_loss'"):
        assert_matches_reference(my_loss, 1.0)
