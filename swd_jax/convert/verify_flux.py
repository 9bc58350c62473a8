"""The FLUX side of `swd-verify`: random inputs, diffusers' FluxTransformer2DModel (+ PEFT) as
FluxPipeline calls it, and our converted Flux (+ imported LoRA), each returning the velocity and every block's
image tokens (double blocks, then single blocks). torch is imported only inside the torch-side functions.

Inputs per example: NCHW latents (16 channels), sigma in [0, 1) (diffusers' FLUX takes sigma, ours 1000 sigma),
context, pooled, and for FLUX-dev a guidance scale (3.5 or 4.5, exact in bf16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from swd_jax.convert.converted import load_diffusers
from swd_jax.convert.peft_lora import import_lora
from swd_jax.models.flux import Flux, FluxConfig

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def make_inputs(cfg: FluxConfig, batch: int, latent: int, text_tokens: int, seed: int, dtype: str):
    """Random (latents NCHW, sigmas [B], context, pooled, guidance [B] or None), rounded to `dtype`, float32 numpy."""
    rng = np.random.default_rng([seed, latent])
    r = lambda a: a.astype(_NP[dtype]).astype(np.float32)
    return (r(rng.standard_normal((batch, cfg.latent_channels, latent, latent), dtype=np.float32)),
            r(rng.uniform(0, 1, batch).astype(np.float32)),
            r(rng.standard_normal((batch, text_tokens, cfg.joint_attention_dim), dtype=np.float32)),
            r(rng.standard_normal((batch, cfg.pooled_projection_dim), dtype=np.float32)),
            rng.choice(np.array([3.5, 4.5], np.float32), batch) if cfg.guidance_embeds else None)


def pack(x_BCHW):
    """FluxPipeline._pack_latents: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
    B, C, H, W = x_BCHW.shape
    return x_BCHW.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens, height: int, width: int):
    """FluxPipeline._unpack_latents: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    B, _, K = tokens.shape
    x = tokens.view(B, height // 2, width // 2, K // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, K // 4, height, width)


def image_ids(height: int, width: int):
    """FluxPipeline._prepare_latent_image_ids for latents height x width: (0, row, col) per packed token."""
    import torch
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def torch_outputs(folder: str, lora: str | None, runs: dict[int, tuple], dtype: str, device: str) -> dict:
    """{size: (velocity NHWC, [block image tokens])} from diffusers' FLUX (+ PEFT), float32 numpy."""
    import torch
    from diffusers import FluxTransformer2DModel

    from swd_jax.convert.torch_transformer import block_features, free_torch_memory, load_torch_transformer

    model = load_torch_transformer(FluxTransformer2DModel, folder, lora, dtype, device)
    tdt = model.dtype
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    to = lambda a: torch.from_numpy(a).to(device, tdt)
    out = {}
    with block_features(blocks) as feats:
        for size, (x, s, c, p, g) in runs.items():
            v = model(hidden_states=pack(to(x)), timestep=to(s), encoder_hidden_states=to(c),
                      pooled_projections=to(p), guidance=None if g is None else to(g),
                      img_ids=image_ids(size, size).to(device), txt_ids=torch.zeros(c.shape[1], 3).to(device)).sample
            v = unpack(v, size, size)
            out[size] = (v.float().cpu().numpy().transpose(0, 2, 3, 1), [feats[i] for i in sorted(feats)])
            feats.clear()
    del model, blocks  # first, then freed: torch and JAX never share the GPU
    free_torch_memory()
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: Flux, variables, x_BHWC, t_B, c_BTJ, p_BP, g_B):
    return model.apply(variables, x_BHWC, t_B, c_BTJ, p_BP, g_B, feature_blocks=tuple(range(model.config.num_blocks)))


def our_outputs(folder: str, lora: str | None, runs: dict[int, tuple], dtype: str, device: str,
                perturb=None, converted: str | None = None) -> dict:
    """{size: (velocity NHWC, [block image tokens])} from our converter + Flux (+ imported LoRA), float32 numpy.

    With `converted` (a checkpoint written by `swd-convert`) our params are read from it, cast to `dtype`."""
    platform = "gpu" if device == "cuda" else device
    try:
        dev = jax.devices(platform)[0]
    except RuntimeError as e:
        raise ValueError(f"--device {device}: JAX has no {platform} backend here ({e})") from e
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    with jax.default_device(dev):
        if converted is not None:
            from swd_jax.convert.converted import load_converted
            cfg, params = load_converted(converted)
            params = jax.tree.map(lambda a: jnp.asarray(a, jdt), params)
        else:
            cfg, params = load_diffusers(folder, dtype=jdt)
        if perturb is not None:
            params = perturb(params)
        variables, lora_cfg = {"params": params}, None
        if lora is not None:
            lora_cfg, variables["lora"] = import_lora(lora, cfg, dtype=jdt)
    variables = jax.device_put(variables, dev)
    model = Flux(cfg, lora=lora_cfg, dtype=jdt, param_dtype=jdt)
    put = lambda a, dt=jdt: None if a is None else jax.device_put(jnp.asarray(a, dt), dev)
    out = {}
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        for size, (x, s, c, p, g) in runs.items():
            t = (s * np.float32(1000)).astype(np.float32)
            v, feats = _forward(model, variables, put(x.transpose(0, 2, 3, 1)), put(t, jnp.float32), put(c), put(p),
                                put(g, jnp.float32))
            out[size] = (np.asarray(v, np.float32), [np.asarray(f, np.float32) for f in feats])
    return out
