"""`python -m swd_jax.convert`: the same as `swd-convert` (swd_jax.cli.convert)."""
import sys

from swd_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
