"""`python -m swd_jax.precompute`: latents at every scale and text embeddings for SwD (see swd_jax.train.precompute)."""
from swd_jax.train.precompute import main

if __name__ == "__main__":
    main()
