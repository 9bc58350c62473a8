"""FLUX VAE: the published FLUX.1 vae/config.json reads as FLUX_VAE (SD3's architecture, FLUX's latent
normalisation, no quant convs); a tiny AutoencoderKL with FLUX's fields matches diffusers' encode/decode and
FluxPipeline's latent (de)normalisation within 1e-5 relative (fp32)."""
import jax.numpy as jnp
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from swd_jax.convert.vae import load_vae, vae_config_from_dict
from swd_jax.models import vae as vae_lib
from tests.test_vae import rel_err

# black-forest-labs/FLUX.1-dev (and -schnell) vae/config.json
FLUX_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False}
TINY_FLUX = {**FLUX_VAE_JSON, "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4,
             "sample_size": 16}


def test_published_config_is_flux_vae():
    assert vae_config_from_dict(FLUX_VAE_JSON) == vae_lib.FLUX_VAE
    assert vae_lib.FLUX_VAE.latent_channels == 16 and vae_lib.FLUX_VAE.downsample_factor == 8
    with pytest.raises(ValueError, match="use_quant_conv and use_post_quant_conv"):
        vae_config_from_dict({**FLUX_VAE_JSON, "use_quant_conv": True})


def test_tiny_flux_vae_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_FLUX.items() if not k.startswith("_")}
    ref = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = load_vae(str(tmp_path))
    cfg = model.config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latent_channels) == (0.3611, 0.1159, 16)
    img = torch.rand(2, 3, 16, 24) * 2 - 1
    x = torch.randn(2, 16, 2, 3)  # a normalised diffusion latent, as the transformer outputs it
    with torch.no_grad():
        mean = ref.encode(img).latent_dist.mean
        # FluxPipeline.__call__'s decode and the diffusers FLUX training scripts' encode
        dec = ref.decode(x / ref.config.scaling_factor + ref.config.shift_factor).sample
        enc = (mean - ref.config.shift_factor) * ref.config.scaling_factor
    ours_enc = vae_lib.encode_images(model, params, jnp.asarray(img.permute(0, 2, 3, 1).numpy()))
    ours_dec = vae_lib.decode_latents(model, params, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    assert ours_enc.shape == (2, 8, 12, 16) and rel_err(ours_enc, enc.permute(0, 2, 3, 1)) < 1e-5
    assert ours_dec.shape == (2, 4, 6, 3) and rel_err(ours_dec, dec.permute(0, 2, 3, 1)) < 1e-5
