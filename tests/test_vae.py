"""SD3 VAE: tiny diffusers AutoencoderKL -> safetensors -> our converter -> same outputs (fp32, 1e-5 relative)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import save_file

from swd_jax.convert.vae import load_vae, vae_config_from_dict
from swd_jax.models import vae as vae_lib

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
            sample_size=16)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error every parity test here asserts."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():  # random affine norms and biases too, so every mapping is exercised
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("vae"))
    ref.save_pretrained(folder, safe_serialization=True)
    model, params = load_vae(folder)
    return ref, folder, model, params


def test_encode_decode_match_diffusers(tiny):
    ref, _, model, params = tiny
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        z = torch.randn(2, 4, 6, 5)
        dec = ref.decode(z).sample
    mean, logvar = model.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                               method=vae_lib.AutoencoderKL.encode)
    out = model.apply({"params": params}, jnp.asarray(z.permute(0, 2, 3, 1).numpy()),
                      method=vae_lib.AutoencoderKL.decode)
    assert rel_err(mean, dist.mean.permute(0, 2, 3, 1)) < 1e-5
    assert rel_err(logvar, dist.logvar.permute(0, 2, 3, 1)) < 1e-5
    assert out.shape == (2, 12, 10, 3)
    assert rel_err(out, dec.permute(0, 2, 3, 1)) < 1e-5


def test_normalisation_slices_and_sampling(tiny):
    _, _, model, params = tiny
    cfg = model.config
    z = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    np.testing.assert_allclose(vae_lib.denormalize_latents(vae_lib.normalize_latents(z, cfg), cfg), z,
                               rtol=1e-6, atol=1e-6)
    # decoding in slices of 2 (3 images: a padded remainder) equals one full-batch decode
    full = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))(
        params, vae_lib.denormalize_latents(z, cfg))
    sliced = jax.jit(vae_lib.decode_latents, static_argnums=(0, 3))(model, params, z, 2)
    assert sliced.shape == full.shape and rel_err(sliced, full) < 1e-6
    img = jnp.clip(full, -1, 1)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))(
        params, img)
    enc = jax.jit(vae_lib.encode_images, static_argnums=(0, 4))(model, params, img, None, 2)
    assert rel_err(enc, (mean - cfg.shift_factor) * cfg.scaling_factor) < 1e-6
    s = vae_lib.sample_latent(mean, logvar, jax.random.key(2))
    assert s.shape == mean.shape and not np.allclose(s, mean)


def test_bf16_compute_close(tiny):
    _, _, model, params = tiny
    m16 = vae_lib.AutoencoderKL(model.config, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.key(3), (1, 4, 4, 4))
    a, b = (jax.jit(lambda p, z, m=m: m.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))(params, z)
            for m in (model, m16))
    assert b.dtype == jnp.bfloat16 and rel_err(b.astype(jnp.float32), a) < 5e-2


def test_bad_config_and_checkpoint(tiny, tmp_path):
    ref, folder, _, _ = tiny
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="quant_conv"):
        vae_config_from_dict({**raw, "use_quant_conv": True})
    with pytest.raises(ValueError, match="unsupported config fields.*'foo'"):
        vae_config_from_dict({**raw, "foo": 1})
    with pytest.raises(ValueError, match="norm_num_groups=3"):
        vae_config_from_dict({**raw, "norm_num_groups": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(str(tmp_path / "nope"))
    # a checkpoint with one tensor missing, one unknown, one of the wrong shape: all three named
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    del sd["decoder.conv_out.bias"]
    sd["encoder.quant_conv.weight"] = torch.zeros(1)
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 1, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        load_vae(str(bad))
    msg = str(e.value)
    assert "decoder/conv_out/bias" in msg and "encoder.quant_conv.weight" in msg and "encoder.conv_in.weight" in msg
