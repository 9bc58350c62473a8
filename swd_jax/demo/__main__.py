"""`python -m swd_jax.demo`: the same as `swd-demo` (swd_jax.cli.demo)."""
import sys

from swd_jax.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
