"""Area / bicubic resize vs torch F.interpolate for every ordered pair of preset scales."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swd_jax.method.resize import area_resize, bicubic_resize, resize

SCALES = (32, 48, 64, 80, 96, 128)


def _torch(x_NCHW: np.ndarray, size, mode: str) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x_NCHW), size=size, mode=mode).numpy()


def test_all_preset_pairs_match_torch():
    rng = np.random.default_rng(0)
    resize_jit = jax.jit(resize, static_argnums=1)
    for a, b in itertools.permutations(SCALES, 2):
        x_NCHW = rng.standard_normal((2, 3, a, a)).astype(np.float32)
        ref = _torch(x_NCHW, b, "area" if b < a else "bicubic")
        got = np.asarray(resize_jit(jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)), b)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{a}->{b}")


@pytest.mark.parametrize("a,b", [(128, 96), (80, 64), (96, 80), (17, 5)])
def test_area_nchw_and_rectangular(a, b):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, a, a + 3)).astype(np.float32)
    ref = _torch(x, (b, b + 1), "area")
    np.testing.assert_allclose(np.asarray(area_resize(jnp.asarray(x), (b, b + 1), layout="NCHW")), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a,b", [(7, 13), (64, 80), (5, 3)])
def test_bicubic_nchw_incl_downscale(a, b):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 1, a, a)).astype(np.float32)
    ref = _torch(x, b, "bicubic")
    np.testing.assert_allclose(np.asarray(bicubic_resize(jnp.asarray(x), b, layout="NCHW")), ref,
                               rtol=1e-5, atol=1e-5)


def test_identity_dtype_and_errors():
    x = jnp.ones((1, 8, 8, 2), jnp.bfloat16)
    assert resize(x, 8) is x
    y = resize(x, 16)
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 16, 16, 2)
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, atol=1e-2)
    with pytest.raises(ValueError, match="4-D"):
        resize(jnp.ones((8, 8, 2)), 4)
    with pytest.raises(ValueError, match="layout"):
        area_resize(jnp.ones((1, 8, 8, 2)), 4, layout="HWC")
    with pytest.raises(ValueError, match="mixed"):
        resize(jnp.ones((1, 8, 8, 2)), (4, 16))
