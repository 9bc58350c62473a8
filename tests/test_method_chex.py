"""The method's functions under chex variants: with and without jit, with inputs placed on a CPU device, and on all
8 fake CPU devices (pmap); shapes and dtypes asserted with chex, values against swd_jax.testing's references.

Dtype contract (as the docstrings say): every loss returns a float32 scalar for float32 and bfloat16 inputs;
dmd_grad is float32 of the input shape; gradients take the dtype of the input; the resizes return the input's
dtype; the samplers return float32.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from swd_jax import testing as ref
from swd_jax.method import losses, resize, sampler

VARIANTS = dict(with_jit=True, without_jit=True, with_device=True, with_pmap=True)
DTYPES = [("f32", jnp.float32), ("bf16", jnp.bfloat16)]
_RNG = np.random.default_rng(0)


def _x(*shape, dtype=jnp.float32, shift=0.0):
    return jnp.asarray(_RNG.standard_normal(shape) + shift, dtype)


def _tol(dtype):  # the reference gets the same (rounded) input values, so only the compute precision differs
    return dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)


class LossVariantsTest(chex.TestCase):

    def _scalar_loss(self, fn, ref_fn, args, dtype):
        out = self.variant(fn)(*args)
        chex.assert_shape(out, ())
        chex.assert_type(out, jnp.float32)
        chex.assert_tree_all_finite(out)
        np.testing.assert_allclose(float(out), float(ref_fn(*[np.asarray(a) for a in args])), **_tol(dtype))

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(
        *[(f"{k}_{ps}_{n}", k, ps, d) for k in ("linear", "rbf") for ps in (True, False) for n, d in DTYPES])
    def test_pdm_loss(self, kernel, per_sample, dtype):
        fn = lambda a, b: losses.pdm_loss(a, b, kernel=kernel, per_sample=per_sample, bandwidth=3.0)
        ref_fn = lambda a, b: ref.pdm_loss(a, b, kernel=kernel, per_sample=per_sample, bandwidth=3.0)
        self._scalar_loss(fn, ref_fn, (_x(2, 5, 4, dtype=dtype), _x(2, 5, 4, dtype=dtype, shift=0.5)), dtype)

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(*DTYPES)
    def test_dmd_loss_and_grad(self, dtype):
        x, x0_t, x0_f = (_x(2, 4, 4, 3, dtype=dtype) for _ in range(3))
        self._scalar_loss(losses.dmd_loss, ref.dmd_loss, (x, x0_t, x0_f), dtype)
        g = self.variant(losses.dmd_grad)(x, x0_t, x0_f)
        chex.assert_shape(g, x.shape)
        chex.assert_type(g, jnp.float32)
        dx = self.variant(jax.grad(losses.dmd_loss))(x, x0_t, x0_f)
        chex.assert_shape(dx, x.shape)
        chex.assert_type(dx, dtype)

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(*DTYPES)
    def test_gan_losses(self, dtype):
        fake, real, fake2 = _x(6, dtype=dtype), _x(6, dtype=dtype), _x(6, dtype=dtype)
        self._scalar_loss(losses.gan_discriminator_loss, ref.gan_discriminator_loss, (fake, real), dtype)
        self._scalar_loss(losses.gan_generator_loss, ref.gan_generator_loss, (fake,), dtype)
        per_block = lambda a, b, c: losses.gan_discriminator_loss([a, b], [c, a])  # lists of per-block logits
        self._scalar_loss(per_block, lambda a, b, c: ref.gan_discriminator_loss([a, b], [c, a]),
                          (fake, fake2, real), dtype)

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(*DTYPES)
    def test_fake_model_loss(self, dtype):
        pred, target = _x(2, 4, 4, 3, dtype=dtype), _x(2, 4, 4, 3, dtype=dtype)
        self._scalar_loss(losses.fake_model_loss, ref.fake_model_loss, (pred, target), dtype)
        d_pred, d_target = self.variant(jax.grad(losses.fake_model_loss, argnums=(0, 1)))(pred, target)
        chex.assert_type([d_pred, d_target], dtype)
        np.testing.assert_array_equal(np.asarray(d_target, np.float32), 0.0)  # the target is a constant


class ResizeAndSamplerVariantsTest(chex.TestCase):

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(
        *[(f"{f.__name__}_{s}_{n}", f, s, d) for f, s in ((resize.area_resize, 4), (resize.bicubic_resize, 12),
                                                          (resize.resize, 6), (resize.resize, 10)) for n, d in DTYPES])
    def test_resize(self, fn, size, dtype):
        x = _x(2, 8, 8, 3, dtype=dtype)
        y = self.variant(lambda a: fn(a, size))(x)
        chex.assert_shape(y, (2, size, size, 3))
        chex.assert_type(y, dtype)
        np.testing.assert_allclose(np.asarray(y, np.float32), getattr(ref, fn.__name__)(np.asarray(x), size),
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                                   atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)

    @chex.variants(**VARIANTS)
    def test_scale_wise_and_euler_samplers(self):
        params, cond = {"a": jnp.float32(0.6)}, jnp.zeros((2, 1, 1, 3))
        sch = ((4, 4, 6), (1.0, 0.7, 0.4, 0.0))
        init, steps = _x(2, 4, 4, 3), (_x(2, 4, 4, 3), _x(2, 6, 6, 3))

        def scale_wise(init, s1, s2):
            return sampler.scale_wise_sample(_velocity, params, cond, None, sch, batch_size=2, channels=3,
                                             noise=sampler.SamplerNoise(init, (s1, s2)))

        out = self.variant(scale_wise)(init, *steps)
        chex.assert_shape(out, (2, 6, 6, 3))
        chex.assert_type(out, jnp.float32)
        want = ref.scale_wise_sample(_velocity, params, cond, None, sch, batch_size=2, channels=3,
                                     noise=sampler.SamplerNoise(*ref._to_numpy((init, steps))))
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
        euler = self.variant(lambda x: sampler.euler_sample(_velocity, params, x, sch[1], cond))(init)
        chex.assert_shape(euler, init.shape)
        chex.assert_type(euler, jnp.float32)
        np.testing.assert_allclose(np.asarray(euler), ref.euler_sample(_velocity, params, np.asarray(init), sch[1],
                                                                       cond), rtol=1e-5, atol=1e-5)


def _velocity(params, x, t, cond):
    return params["a"] * x + t[:, None, None, None] / 1000.0 + cond


def test_eight_cpu_devices_for_the_pmap_variant():
    chex.assert_equal(jax.device_count(), 8)  # tests/conftest.py: --xla_force_host_platform_device_count=8
