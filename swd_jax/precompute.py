"""`python -m swd_jax.precompute`: VAE posterior moments at every scale and text embeddings for SwD (see swd_jax.train.precompute)."""
import sys

from swd_jax.train.precompute import main

if __name__ == "__main__":
    sys.exit(main())
