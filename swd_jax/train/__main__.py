"""`python -m swd_jax.train`: the same as `swd-train` (swd_jax.cli.train)."""
import sys

from swd_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
