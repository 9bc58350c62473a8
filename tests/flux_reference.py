"""Tiny random diffusers FLUX transformers and a torch forward with FluxPipeline's packing (no downloads)."""
from __future__ import annotations

import numpy as np
import torch

from swd_jax.convert import verify_flux
from swd_jax.convert.verify_flux import image_ids  # noqa: F401 (re-exported for the tests)


def tiny_flux_config(guidance_embeds: bool, num_layers: int = 2, num_single_layers: int = 2, **overrides) -> dict:
    """FLUX-shaped (patch 1, 4x packed channels, 3-axis RoPE) but tiny: 4 latent channels, width 32."""
    return {**dict(patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                   guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)), **overrides}


def tiny_flux_transformer(guidance_embeds: bool, seed: int = 0, **kw):
    """A diffusers FluxTransformer2DModel with random weights everywhere (incl. the zero-initialised ones)."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**tiny_flux_config(guidance_embeds, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1  # fan-in scale, as a trained model has
            p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return model.eval()


def flux_inputs(cfg: dict, batch: int, height: int, width: int, tokens: int = 5, seed: int = 1):
    """Random NHWC latents, per-example sigmas in [0, 1), context, pooled and (dev) per-example guidance scales.

    Our model takes timestep = float32(sigma) * 1000, exactly what diffusers' FLUX computes from its input sigma.
    """
    rng = np.random.default_rng(seed)
    c = cfg["in_channels"] // 4
    return (rng.standard_normal((batch, height, width, c), dtype=np.float32),
            rng.uniform(0, 1, (batch,)).astype(np.float32),
            rng.standard_normal((batch, tokens, cfg["joint_attention_dim"]), dtype=np.float32),
            rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32),
            # Per-example guidance: FLUX-dev's default 3.5, FLUX-SwD's 4.5, 1. Larger scales lose digits on both
            # sides: 1000 g ~ 5000 times a frequency that torch's float32 exp rounds 1 ulp off (index 12 of 128)
            # moves diffusers' embedding by ~2e-4 (see layers.timestep_embedding).
            rng.permutation(np.array([3.5, 4.5, 1.0] * batch, np.float32))[:batch] if cfg["guidance_embeds"] else None)


def pack(x_BHWC: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents of our NHWC latents."""
    return verify_flux.pack(x_BHWC.permute(0, 3, 1, 2))


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FluxPipeline._unpack_latents, then NHWC."""
    return verify_flux.unpack(tokens, height, width).permute(0, 2, 3, 1)


def torch_flux_forward(model, x_BHWC, sigma_B, context, pooled, guidance=None, hook_blocks=()):
    """diffusers FLUX forward as FluxPipeline calls it (timestep = sigma, packed latents, ids) -> (v NHWC, feats).

    `hook_blocks` numbers double then single blocks; each hook captures that block's image hidden states.
    """
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    feats, handles = {}, []
    for i in hook_blocks:
        handles.append(blocks[i].register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(i, out[1].detach().numpy())))
    x = torch.as_tensor(np.asarray(x_BHWC))
    H, W = x.shape[1:3]
    with torch.no_grad():
        v = model(hidden_states=pack(x), timestep=torch.as_tensor(np.asarray(sigma_B)),
                  encoder_hidden_states=torch.as_tensor(np.asarray(context)),
                  pooled_projections=torch.as_tensor(np.asarray(pooled)),
                  guidance=None if guidance is None else torch.as_tensor(np.asarray(guidance)),
                  img_ids=image_ids(H, W), txt_ids=torch.zeros(context.shape[1], 3)).sample
    for h in handles:
        h.remove()
    return unpack(v, H, W).numpy(), feats
