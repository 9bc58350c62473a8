"""Scale-wise Distillation (SwD, arXiv 2503.16397) of SD3.5 and FLUX in JAX/Flax.

The parts, top to bottom; each imports only itself and the parts below it (tests/test_layout.py):
    swd_jax.cli        the console scripts (swd-train, swd-convert, swd-verify, swd-precompute, swd-generate,
                       swd-evaluate, swd-demo, swd-tiny-kit) and their one contract
    swd_jax.demo       the built-in digits default and the tiny kit
    swd_jax.train      the trainer (loop, steps, setup, data, checkpoints, sharding, validation, distributed)
    swd_jax.pipeline   SwDPipeline: prompts -> images for any backbone, without the trainer
    swd_jax.eval       FID, CLIP score, PickScore, the evaluation protocol
    swd_jax.convert    every loader: diffusers / transformers / PEFT / pytorch-fid files <-> params, prompt encoders
    swd_jax.models     MMDiT, FLUX, VAE, text encoders, Inception, CLIP vision, attention kernels, block scan
    swd_jax.method     the method below, pure functions of arrays and params
    swd_jax.storage, swd_jax.image_files, swd_jax.testing   local and gs:// files, PNGs, NumPy references

The method itself is a small library of pure functions of arrays, each documented with a runnable example
(run as doctests by tests/test_doctests.py); `import swd_jax` imports nothing, so import the modules below.

swd_jax.method.losses (METHOD.md s.5; all return float32 scalars for any input dtype, bf16 included)
    pdm_loss(feat_fake_BLD, feat_real_BLD, kernel, per_sample, c, bandwidth)   patch distribution matching
    pdm_linear, pdm_rbf                      its two kernels (pseudo-Huber on token means; unbiased RBF MMD^2)
    dmd_grad(x_fake, x0_teacher, x0_fake)    the DMD direction g = (p_real - p_fake) / mean|p_real|
    dmd_loss(x_fake, x0_teacher, x0_fake)    0.5 * mean((x - sg(x - g))^2), whose gradient is g / numel
    gan_discriminator_loss(logits_fake, logits_real), gan_generator_loss(logits_fake)   softplus GAN losses
    fake_model_loss(x0_pred, x0_target)      the fake score model's x0 MSE
swd_jax.method.schedule (METHOD.md s.1-2)
    flow_match_sigmas, flow_match_timesteps  diffusers-exact shifted sigma grid and its timesteps
    flux_dynamic_sigmas                      FluxPipeline's resolution-shifted sigmas
    add_noise(x0, eps, sigma)                x_sigma = sigma eps + (1 - sigma) x0
    ScaleSchedule, get_schedule, PRESETS     scales + boundary indices (sd35_medium_4/6, sd35_large_4, flux_4)
swd_jax.method.resize (torch-exact)
    area_resize, bicubic_resize (a = -0.75), bilinear_resize, resize (area down / bicubic up), *_matrix
swd_jax.method.sampler (METHOD.md s.3)
    scale_wise_sample, euler_sample, SamplerNoise, mmdit_velocity, flux_velocity
swd_jax.testing (NumPy only: no jax, no torch)
    reference implementations of the functions above under the same names and signatures, and
    assert_matches_reference(fn, *args, **kwargs) to check your own implementation against them.
"""
