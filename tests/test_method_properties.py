"""Property tests (hypothesis) of the method's functions; each `check_*` takes the implementation under test, so
tests/broken_method_demo.py and test_properties_catch_broken_variants can feed it deliberately broken ones.

Shapes come from a few fixed sets (sampled_from) so jitted code compiles once per shape; arrays are drawn from
a hypothesis-chosen seed. What the math does NOT give, and so is not asserted: unbiased RBF PDM is not 0 for
equal sets (see pdm_rbf's docstring); area resize preserves the mean only at integer ratios (torch's bins overlap
otherwise); the scale-wise sampler equals Euler only when each re-noise draw is the implied noise x0 + v.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swd_jax.method import losses, resize, sampler, schedule

# derandomize: CI sees the same examples every run (no flaky failures); database=None: no .hypothesis/ folder.
_COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=25, **_COMMON)
SLOW = settings(max_examples=10, **_COMMON)
seeds = st.integers(0, 2**32 - 1)
feat_shapes = st.sampled_from([(1, 3, 2), (2, 4, 3), (3, 5, 4)])
x_shapes = st.sampled_from([(1, 2, 2, 1), (2, 3, 3, 2)])
kernels = st.sampled_from([("linear", True), ("linear", False), ("rbf", True), ("rbf", False)])


def _normal(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---- PDM ----
def check_pdm_zero_for_equal_sets(pdm, seed, shape, per_sample):
    f = _normal(seed, shape, 3.0)
    assert abs(float(pdm(f, f, kernel="linear", per_sample=per_sample))) <= 1e-6, "PDM of equal sets is not 0"


def check_pdm_symmetric(pdm, seed, shape, kernel, per_sample):
    a, b = _normal(seed, shape), _normal(seed + 1, shape, 2.0)
    kw = dict(kernel=kernel, per_sample=per_sample, bandwidth=2.0)
    np.testing.assert_allclose(float(pdm(a, b, **kw)), float(pdm(b, a, **kw)), rtol=1e-5, atol=1e-6,
                               err_msg="PDM is not symmetric")


def check_pdm_order_invariant(pdm, seed, shape, kernel, per_sample):
    """Token order within each set (independently for fake and real) and example order (jointly) do not matter."""
    rng = np.random.default_rng(seed)
    a, b = _normal(seed, shape), _normal(seed + 1, shape, 2.0)
    kw = dict(kernel=kernel, per_sample=per_sample, bandwidth=2.0)
    want = float(pdm(a, b, **kw))
    tok_a, tok_b = (np.stack([rng.permutation(shape[1]) for _ in range(shape[0])]) for _ in range(2))
    a2, b2 = np.take_along_axis(a, tok_a[..., None], 1), np.take_along_axis(b, tok_b[..., None], 1)
    ex = rng.permutation(shape[0])
    np.testing.assert_allclose(float(pdm(a2[ex], b2[ex], **kw)), want, rtol=1e-5, atol=1e-6,
                               err_msg="PDM depends on the order of tokens or examples")


def check_pdm_is_a_mean(pdm, seed, shape, per_sample):
    """Linear PDM averages over examples and features: duplicating either leaves it unchanged."""
    a, b = _normal(seed, shape), _normal(seed + 1, shape, 2.0)
    want = float(pdm(a, b, kernel="linear", per_sample=per_sample))
    for a2, b2 in ((np.concatenate([a, a]), np.concatenate([b, b])), (np.tile(a, 2), np.tile(b, 2))):
        got = float(pdm(a2, b2, kernel="linear", per_sample=per_sample))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg="PDM changed when data were duplicated")


@FAST
@given(seeds, feat_shapes, st.booleans())
def test_pdm_is_a_mean(seed, shape, per_sample):
    check_pdm_is_a_mean(losses.pdm_loss, seed, shape, per_sample)


@FAST
@given(seeds, feat_shapes, st.booleans())
def test_pdm_zero_for_equal_sets(seed, shape, per_sample):
    check_pdm_zero_for_equal_sets(losses.pdm_loss, seed, shape, per_sample)


@FAST
@given(seeds, feat_shapes, kernels)
def test_pdm_symmetric(seed, shape, kernel):
    check_pdm_symmetric(losses.pdm_loss, seed, shape, *kernel)


@FAST
@given(seeds, feat_shapes, kernels)
def test_pdm_order_invariant(seed, shape, kernel):
    check_pdm_order_invariant(losses.pdm_loss, seed, shape, *kernel)


# ---- DMD ----
def check_dmd_gradient_is_g_over_numel(loss, seed, shape):
    import jax
    x, x0_t, x0_f = _normal(seed, shape), _normal(seed + 1, shape), _normal(seed + 2, shape)
    g = np.asarray(losses.dmd_grad(x, x0_t, x0_f))
    dx = np.asarray(jax.grad(loss)(x, x0_t, x0_f))
    np.testing.assert_allclose(dx * x.size, g, rtol=1e-4, atol=1e-5 * (1 + np.abs(x).max()),
                               err_msg="d dmd_loss / d x_fake != dmd_grad / numel")


@FAST
@given(seeds, x_shapes)
def test_dmd_gradient_is_g_over_numel(seed, shape):
    check_dmd_gradient_is_g_over_numel(losses.dmd_loss, seed, shape)


# ---- GAN ----
def _bump(seed, n):
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-5, 5, n).astype(np.float32)
    mask = rng.random(n) < 0.5
    mask[rng.integers(n)] = True  # at least one logit grows
    return logits, logits + mask * rng.uniform(0.5, 3.0, n).astype(np.float32)


def check_gan_monotone(gen_loss, disc_loss, seed, n):
    """Generator loss falls as fake logits rise; discriminator loss rises with fake and falls with real logits."""
    lo, hi = _bump(seed, n)
    other = _normal(seed + 1, (n,))
    assert float(gen_loss(hi)) < float(gen_loss(lo)), "generator loss did not fall as the fake logits rose"
    assert float(disc_loss(hi, other)) > float(disc_loss(lo, other)), "D loss did not rise with the fake logits"
    assert float(disc_loss(other, hi)) < float(disc_loss(other, lo)), "D loss did not fall as the real logits rose"


@FAST
@given(seeds, st.sampled_from([1, 4, 8]))
def test_gan_losses_monotone_in_logits(seed, n):
    check_gan_monotone(losses.gan_generator_loss, losses.gan_discriminator_loss, seed, n)


# ---- schedule ----
@FAST
@given(st.integers(1, 60), st.floats(0.5, 6.0))
def test_sigmas_monotone(num_steps, shift):
    s = schedule.flow_match_sigmas(num_steps, shift)
    # diffusers' float32 arithmetic gives 1 - 1 or 2 ulps for some non-integer shifts; we match it (reference kit)
    assert s.shape == (num_steps + 1,) and abs(s[0] - 1.0) <= 3e-7 and s[-1] == 0.0
    assert np.all(np.diff(s) < 0), s
    np.testing.assert_allclose(schedule.flow_match_timesteps(num_steps, shift), 1000 * s[:-1], rtol=1e-6)


@st.composite
def scale_schedules(draw):
    n = draw(st.integers(2, 40))
    k = draw(st.integers(1, min(n, 6)))
    inner = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    scales = sorted(draw(st.lists(st.sampled_from([2, 4, 8, 16]), min_size=k, max_size=k)))
    return schedule.ScaleSchedule(scales=tuple(scales), boundaries=(0, *inner, n), num_train_steps=n,
                                  shift=draw(st.floats(1.0, 4.0)))


@FAST
@given(scale_schedules(), st.integers(0, 10_000))
def test_schedule_boundaries_map_back_to_indices(sch, step):
    sig, b = sch.sigmas, np.asarray(sch.boundaries)
    assert np.all(np.diff(sch.sampling_sigmas) < 0)
    back = np.abs(sig[None, :] - sch.boundary_sigmas[:, None]).argmin(axis=1)  # the grid index of each sigma
    np.testing.assert_array_equal(back, b)
    np.testing.assert_array_equal(sch.boundary_timesteps, sch.timesteps[b[:-1]])
    k = sch.interval(step)
    assert sch.start_index(k) == b[k] < sch.end_index(k) == b[k + 1] and sch.prev_scale(k) <= sch.scale(k)


# ---- resize ----
@FAST
@given(seeds, st.sampled_from([(4, 2), (6, 3), (6, 2), (8, 4), (9, 3)]), st.sampled_from(["NHWC", "NCHW"]))
def test_area_resize_preserves_the_mean_at_integer_ratios(seed, sizes, layout):
    n, out = sizes
    x = _normal(seed, (2, n, n, 3) if layout == "NHWC" else (2, 3, n, n))
    axes = (1, 2) if layout == "NHWC" else (2, 3)
    y = np.asarray(resize.area_resize(x, out, layout=layout))
    np.testing.assert_allclose(y.mean(axis=axes), x.mean(axis=axes), atol=1e-6)


@FAST
@given(seeds, st.sampled_from([(4, 8), (5, 15), (6, 12), (8, 16), (8, 24)]), st.floats(0.0, 0.25))
def test_bicubic_up_then_area_down_is_near_identity_on_smooth_inputs(seed, sizes, freq):
    """A smooth image (<= 1/4 cycle across it, random phases and amplitudes) up by an integer factor and back
    comes back within 3% of its peak (measured worst 1.8%, at 4 -> 8). At non-integer ratios torch's area bins
    are uneven (e.g. 9 -> 6 averages rows 0-1, 1-2, 3-4, ...), which shifts the image by several % (6 -> 9 -> 6)."""
    n, up = sizes
    rng = np.random.default_rng(seed)
    u = (np.arange(n) + 0.5) / n
    x = sum(rng.normal() * np.cos(2 * np.pi * freq * (rng.integers(0, 2) * u[:, None] + rng.integers(0, 2) * u)
                                   + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    x = np.asarray(x, np.float32)[None, :, :, None]
    y = np.asarray(resize.area_resize(resize.bicubic_resize(x, up), n))
    np.testing.assert_allclose(y, x, atol=0.03 * (1 + np.abs(x).max()))


# ---- sampler ----
def _velocity(params, x, t, cond):  # linear in x, depends on t and cond: a toy model that uses every input
    return params["a"] * x + params["b"] * t[:, None, None, None] / 1000.0 + cond


def check_scale_wise_equal_scales_is_euler(scale_wise, seed, k, a, b):
    """Scales all equal, re-noise draw = the implied noise x0 + v  =>  the scale-wise sampler is Euler."""
    rng = np.random.default_rng(seed)
    sigmas = np.concatenate([[1.0], np.sort(rng.uniform(0.05, 0.95, k - 1))[::-1], [0.0]]).astype(np.float32)
    params, cond = {"a": np.float32(a), "b": np.float32(b)}, _normal(seed + 1, (2, 1, 1, 3))
    x = x_init = _normal(seed, (2, 4, 4, 3))
    steps = []
    for i in range(k - 1):  # the Euler trajectory in float64, and its implied noise at each step
        t = np.full((2,), sigmas[i] * np.float32(1000), np.float32)
        v = _velocity(params, x, t, cond)
        steps.append((x - sigmas[i] * v + v).astype(np.float32))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    noise = sampler.SamplerNoise(x_init, tuple(steps))
    got = scale_wise(_velocity, params, cond, None, ((4,) * k, sigmas), batch_size=2, channels=3, noise=noise)
    want = sampler.euler_sample(_velocity, params, x_init, sigmas, cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@SLOW
@given(seeds, st.integers(1, 4), st.floats(-1.0, 1.0), st.floats(-1.0, 1.0))
def test_scale_wise_with_equal_scales_is_euler(seed, k, a, b):
    check_scale_wise_equal_scales_is_euler(sampler.scale_wise_sample, seed, k, a, b)


# ---- the properties catch bugs (tests/broken_method_demo.py prints the failures) ----
def find_failure(check, strategies: tuple, max_examples: int = 25) -> str | None:
    """Run `check(*drawn)` under hypothesis; return the failure message (or None if it always passed)."""
    run = settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                   suppress_health_check=list(HealthCheck))(given(*strategies)(check))
    try:
        run()
    except AssertionError as e:
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        return " / ".join(lines[:2]) if lines else type(e).__name__
    return None


def broken_variants():
    """(name, check, strategies) for deliberately broken losses; `check` must fail on each."""
    import jax
    import jax.numpy as jnp
    flip_gen = lambda l: jnp.mean(jax.nn.softplus(_as(l)))  # sign flipped: softplus(+D_fake)
    flip_disc = lambda f, r: jnp.mean(jax.nn.softplus(f)) + jnp.mean(jax.nn.softplus(r))  # real sign flipped

    def dmd_sum(x, x0_t, x0_f):  # mean -> sum in the DMD MSE
        g = losses.dmd_grad(x, x0_t, x0_f)
        return 0.5 * jnp.sum((x - jax.lax.stop_gradient(x - g)) ** 2)

    def pdm_sum(a, b, kernel="linear", per_sample=True, bandwidth=100.0):  # mean -> sum over features
        return losses.pdm_loss(a, b, kernel=kernel, per_sample=per_sample, bandwidth=bandwidth) * a.shape[-1]

    def pdm_first_token(a, b, kernel="linear", per_sample=True, bandwidth=100.0):  # token mean -> first token
        return losses.pdm_loss(a[:, :1], b[:, :1], kernel="linear", per_sample=per_sample)

    return [
        ("gan_generator_loss: softplus(-D) -> softplus(+D)",
         lambda s, n: check_gan_monotone(flip_gen, losses.gan_discriminator_loss, s, n), (seeds, st.just(4))),
        ("gan_discriminator_loss: softplus(-D_real) -> softplus(+D_real)",
         lambda s, n: check_gan_monotone(losses.gan_generator_loss, flip_disc, s, n), (seeds, st.just(4))),
        ("dmd_loss: mean -> sum", lambda s, sh: check_dmd_gradient_is_g_over_numel(dmd_sum, s, sh), (seeds, x_shapes)),
        ("pdm_loss: mean over features -> sum (zero-for-equal)",
         lambda s, sh: check_pdm_zero_for_equal_sets(pdm_sum, s, sh, True), (seeds, feat_shapes)),
        ("pdm_loss: mean over features -> sum (symmetry)",
         lambda s, sh: check_pdm_symmetric(pdm_sum, s, sh, "linear", True), (seeds, feat_shapes)),
        ("pdm_loss: mean over features -> sum (is-a-mean)",
         lambda s, sh: check_pdm_is_a_mean(pdm_sum, s, sh, True), (seeds, feat_shapes)),
        ("pdm_loss: token mean -> first token (order invariance)",
         lambda s, sh: check_pdm_order_invariant(pdm_first_token, s, sh, "linear", True),
         (seeds, st.just((2, 4, 3)))),
    ]


def _as(l):
    import jax.numpy as jnp
    return jnp.asarray(l, jnp.float32)


CAUGHT = ("gan_generator_loss", "gan_discriminator_loss", "dmd_loss", "pdm_loss: token mean", "pdm_loss: mean over "
          "features -> sum (is-a-mean)")


@pytest.mark.parametrize("name,check,strategies", [v for v in broken_variants() if v[0].startswith(CAUGHT)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_properties_catch_broken_variants(name, check, strategies):
    assert find_failure(check, strategies, max_examples=10) is not None, f"no property caught: {name}"
