"""The method: scale-time schedule, torch-exact resizes, scale-wise sampler, losses and discriminator head; pure
functions of arrays and params (see `help(swd_jax)`)."""
