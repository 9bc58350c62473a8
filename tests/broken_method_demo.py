"""Which property, or the reference check, catches each deliberately broken loss (issue 27's demonstration).

Run: JAX_PLATFORMS=cpu python -m tests.broken_method_demo   (about 10 s on a CPU)
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from swd_jax import testing  # noqa: E402
from swd_jax.method import losses  # noqa: E402
from tests.test_method_properties import broken_variants, find_failure  # noqa: E402


def main():
    for name, check, strategies in broken_variants():
        failure = find_failure(check, strategies)
        print(f"{name:62s} {'CAUGHT: ' + failure if failure else 'not caught by this property'}")

    def pdm_loss(a, b, **kw):  # the same mean -> sum bug, against the NumPy reference
        return losses.pdm_loss(a, b, **kw) * a.shape[-1]

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 3), np.float32), rng.standard_normal((2, 4, 3), np.float32)
    try:
        testing.assert_matches_reference(pdm_loss, a, b)
        print("pdm_loss: mean over features -> sum (reference check)        not caught")
    except AssertionError as e:
        print(f"{'pdm_loss: mean over features -> sum (reference check)':62s} CAUGHT: {e}")


if __name__ == "__main__":
    main()
