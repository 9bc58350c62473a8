"""Tiny random diffusers SD3 transformers for the equivalence tests (built from configs, no downloads)."""
from __future__ import annotations

import numpy as np
import torch

VARIANTS = {
    # SD3-Medium: plain joint blocks.
    "sd3_medium": dict(dual_attention_layers=(), qk_norm=None),
    # SD3.5-Medium (MMDiT-X): dual attention in the first layers, RMS qk-norm.
    "sd35_medium": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    # SD3.5-Large: qk-norm, no dual attention.
    "sd35_large": dict(dual_attention_layers=(), qk_norm="rms_norm"),
}


def tiny_sd3_config(variant: str, num_layers: int = 3) -> dict:
    return dict(sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, **VARIANTS[variant])


def tiny_sd3_transformer(variant: str, seed: int = 0, num_layers: int = 3, std: float | None = None):
    """A diffusers SD3Transformer2DModel with random weights everywhere (incl. the zero-initialised ones).

    std None: fan-in scale for matrices, 0.1 for vectors, as a trained model has; a number: N(0, std^2) on every
    parameter. Norm scales (1-D weights of norm layers) are centred on 1 either way.
    """
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_sd3_config(variant, num_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = std if std is not None else p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn_like(p) * s + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return model.eval()


def sd3_inputs(cfg: dict, batch: int, latent: int, tokens: int = 7, seed: int = 1):
    """Random NCHW latents, per-example timesteps, context and pooled, as numpy float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, cfg["in_channels"], latent, latent), dtype=np.float32),
            rng.uniform(0, 1000, (batch,)).astype(np.float32),
            rng.standard_normal((batch, tokens, cfg["joint_attention_dim"]), dtype=np.float32),
            rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32))


def torch_forward(model, inputs, hook_blocks=()):
    """diffusers forward -> (velocity NCHW, {block: image hidden states}) captured with forward hooks."""
    feats, handles = {}, []
    for i in hook_blocks:
        handles.append(model.transformer_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(i, out[1].detach().numpy())))
    x, t, c, p = (torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=p).sample.numpy()
    for h in handles:
        h.remove()
    return v, feats


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
