"""Scale-wise Distillation (SwD, arXiv 2503.16397) of SD3.5 and FLUX in JAX/Flax.

The method itself is a small library of pure functions of arrays, each documented with a runnable example
(run as doctests by tests/test_doctests.py); `import swd_jax` imports nothing, so import the modules below.

swd_jax.losses (METHOD.md s.5; all return float32 scalars for any input dtype, bf16 included)
    pdm_loss(feat_fake_BLD, feat_real_BLD, kernel, per_sample, c, bandwidth)   patch distribution matching
    pdm_linear, pdm_rbf                      its two kernels (pseudo-Huber on token means; unbiased RBF MMD^2)
    dmd_grad(x_fake, x0_teacher, x0_fake)    the DMD direction g = (p_real - p_fake) / mean|p_real|
    dmd_loss(x_fake, x0_teacher, x0_fake)    0.5 * mean((x - sg(x - g))^2), whose gradient is g / numel
    gan_discriminator_loss(logits_fake, logits_real), gan_generator_loss(logits_fake)   softplus GAN losses
    fake_model_loss(x0_pred, x0_target)      the fake score model's x0 MSE
swd_jax.schedule (METHOD.md s.1-2)
    flow_match_sigmas, flow_match_timesteps  diffusers-exact shifted sigma grid and its timesteps
    flux_dynamic_sigmas                      FluxPipeline's resolution-shifted sigmas
    add_noise(x0, eps, sigma)                x_sigma = sigma eps + (1 - sigma) x0
    ScaleSchedule, get_schedule, PRESETS     scales + boundary indices (sd35_medium_4/6, sd35_large_4, flux_4)
swd_jax.resize (torch-exact)
    area_resize, bicubic_resize (a = -0.75), bilinear_resize, resize (area down / bicubic up), *_matrix
swd_jax.sampler (METHOD.md s.3)
    scale_wise_sample, euler_sample, SamplerNoise, mmdit_velocity, flux_velocity
swd_jax.testing (NumPy only: no jax, no torch)
    reference implementations of the functions above under the same names and signatures, and
    assert_matches_reference(fn, *args, **kwargs) to check your own implementation against them.
"""
