"""diffusers `vae/` folder (config.json + safetensors) -> `VAEConfig` and Flax params of `models.vae.AutoencoderKL`.

Key table: the last module name of a diffusers key decides the layer kind (conv / group norm / linear);
module paths map one to one (`encoder.down_blocks.0.resnets.1.conv1.weight` ->
`encoder/down_blocks_0/resnets_1/conv1/kernel`, OIHW -> HWIO). Everything is checked by `convert.strict`.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.strict import abstract_params, check_fields, convert_tensors, read_config, require, table_rename
from swd_jax.models.vae import AutoencoderKL, VAEConfig

VAE_LEAF_KINDS = {
    "conv_in": "conv", "conv_out": "conv", "conv1": "conv", "conv2": "conv", "conv_shortcut": "conv",
    "conv": "conv",  # downsamplers_0.conv, upsamplers_0.conv
    "norm1": "norm", "norm2": "norm", "conv_norm_out": "norm", "group_norm": "norm",
    "to_q": "linear", "to_k": "linear", "to_v": "linear", "to_out_0": "linear",
}

# diffusers AutoencoderKL.__init__ defaults, applied to fields a config.json leaves out (as diffusers does).
_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                 act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                 latents_mean=None, latents_std=None, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=True)
_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast")


def vae_config_from_dict(raw: dict, where: str = "vae/config.json") -> VAEConfig:
    """A diffusers AutoencoderKL config dict -> VAEConfig; any field or value the SD3 / FLUX VAE does not use
    raises."""
    check_fields(raw, used=_DEFAULTS, ignored=_IGNORED, where=where)
    require(raw.get("_class_name", "AutoencoderKL") == "AutoencoderKL", where,
            f"_class_name {raw.get('_class_name')!r}, expected 'AutoencoderKL'")
    c = {**_DEFAULTS, **raw}
    n = len(c["block_out_channels"])
    require(list(c["down_block_types"]) == ["DownEncoderBlock2D"] * n, where,
            f"down_block_types {c['down_block_types']} (only DownEncoderBlock2D x {n})")
    require(list(c["up_block_types"]) == ["UpDecoderBlock2D"] * n, where,
            f"up_block_types {c['up_block_types']} (only UpDecoderBlock2D x {n})")
    require(c["act_fn"] == "silu", where, f"act_fn {c['act_fn']!r} (only 'silu')")
    require(not c["use_quant_conv"] and not c["use_post_quant_conv"], where,
            "quant_conv / post_quant_conv (the SD3 and FLUX VAEs have neither; use_quant_conv and use_post_quant_conv "
            "must be false)")
    require(c["latents_mean"] is None and c["latents_std"] is None, where,
            "latents_mean / latents_std (SD3 and FLUX normalise with shift_factor and scaling_factor only)")
    return VAEConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]), block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]), norm_num_groups=int(c["norm_num_groups"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]), scaling_factor=float(c["scaling_factor"]),
        shift_factor=0.0 if c["shift_factor"] is None else float(c["shift_factor"]))


def load_vae_config(folder: str) -> VAEConfig:
    """`folder/config.json` (a diffusers `vae/` folder) -> VAEConfig."""
    return vae_config_from_dict(read_config(folder, where=f"VAE {folder}"), where=os.path.join(folder, "config.json"))


def load_vae(folder: str, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[AutoencoderKL, dict]:
    """(model, params as numpy) from a diffusers `vae/` folder; strict: see `convert.strict.convert_tensors`."""
    config = load_vae_config(folder)
    model = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    f = config.downsample_factor
    abstract = abstract_params(model, jnp.zeros((1, f, f, config.in_channels), jnp.float32))
    params = convert_tensors(SafetensorsFolder(folder, prefix="diffusion_pytorch_model"),
                             table_rename(VAE_LEAF_KINDS), abstract, where=f"VAE {folder}")
    return model, params
