"""Real-weight parity of our VAE, CLIP-L/G and T5 against diffusers/transformers (for `swd_jax.cli.verify` on a GPU).

`compare_components(folder)` runs each PyTorch reference first (float32, on CUDA when available), keeps its
outputs on the host and frees it, then runs our JAX port on the same inputs, so the two never share device
memory. Set XLA_PYTHON_CLIENT_PREALLOCATE=false so JAX leaves room for torch. Errors are max|a-b| / max|b|.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PROMPTS = ("a photo of a red fox in the snow, highly detailed",
                   "An astronaut riding a horse on the moon, oil painting",
                   "")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _test_image(size: int, batch: int = 2) -> np.ndarray:
    """A deterministic smooth-plus-noise image batch in [-1, 1], NHWC."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    base = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy - xx), xx * yy], -1)
    img = base[None] * 0.8 + 0.2 * rng.standard_normal((batch, size, size, 3))
    return np.clip(img, -1, 1).astype(np.float32)


def _free_torch(torch):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_vae(folder: str, image_size: int = 256, torch_device: str | None = None) -> dict[str, float]:
    """Relative errors of our VAE encode (mean, logvar) and decode vs diffusers' AutoencoderKL on `folder/vae`."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from swd_jax.convert.vae import load_vae
    from swd_jax.models.vae import AutoencoderKL

    dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    img = _test_image(image_size)
    ref = TorchVAE.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32).to(dev).eval()
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(img).permute(0, 3, 1, 2).to(dev)).latent_dist
        want_mean = dist.mean.permute(0, 2, 3, 1).cpu().numpy()
        want_logvar = dist.logvar.permute(0, 2, 3, 1).cpu().numpy()
        want_dec = ref.decode(dist.mean).sample.permute(0, 2, 3, 1).cpu().numpy()
    del ref, dist
    _free_torch(torch)
    model, params = load_vae(os.path.join(folder, "vae"))
    params = jax.device_put(params)
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    mean, logvar = enc(params, jnp.asarray(img))
    out = dec(params, jnp.asarray(want_mean))
    return {"vae.encode_mean": _rel(mean, want_mean), "vae.encode_logvar": _rel(logvar, want_logvar),
            "vae.decode": _rel(out, want_dec)}


def compare_text(folder: str, prompts: Sequence[str] = DEFAULT_PROMPTS, max_sequence_length: int = 256,
                 torch_device: str | None = None) -> dict[str, float]:
    """Relative errors of our SD3 prompt encoding (and each encoder's slice of it) vs the diffusers pipeline."""
    import torch
    import transformers
    from diffusers import StableDiffusion3Pipeline

    from swd_jax.convert.prompt_encoding import SD3PromptEncoder, check_components

    check_components(folder)
    dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    j = lambda s: os.path.join(folder, s)
    comps = dict(
        text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(j("text_encoder"), dtype=torch.float32),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(j("text_encoder_2"),
                                                                                dtype=torch.float32),
        text_encoder_3=transformers.T5EncoderModel.from_pretrained(j("text_encoder_3"), dtype=torch.float32),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(j("tokenizer")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(j("tokenizer_2")),
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(j("tokenizer_3")))
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **comps).to(dev)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=torch.device(dev),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    pe, pooled = pe.float().cpu().numpy(), pooled.float().cpu().numpy()
    del pipe, comps
    _free_torch(torch)
    enc = SD3PromptEncoder(folder, max_sequence_length=max_sequence_length)
    ours, ours_pooled = (np.asarray(a) for a in enc.encode_prompt(list(prompts)))
    wl, wg = enc.models.clip_l.config.hidden_size, enc.models.clip_g.config.hidden_size
    pl = enc.models.clip_l.config.projection_dim
    L = enc.clip_length
    return {
        "text.prompt_embeds": _rel(ours, pe), "text.pooled": _rel(ours_pooled, pooled),
        "clip_l.penultimate": _rel(ours[:, :L, :wl], pe[:, :L, :wl]),
        "clip_g.penultimate": _rel(ours[:, :L, wl:wl + wg], pe[:, :L, wl:wl + wg]),
        "t5.last_hidden_state": _rel(ours[:, L:], pe[:, L:]),
        "clip_l.text_embeds": _rel(ours_pooled[:, :pl], pooled[:, :pl]),
        "clip_g.text_embeds": _rel(ours_pooled[:, pl:], pooled[:, pl:]),
    }


def compare_components(folder: str, *, image_size: int = 256, prompts: Sequence[str] = DEFAULT_PROMPTS,
                       max_sequence_length: int = 256, torch_device: str | None = None) -> dict[str, float]:
    """{name: relative error} of VAE, CLIP-L, CLIP-G, T5 and the full prompt encoding on real weights."""
    out = compare_vae(folder, image_size, torch_device)
    out.update(compare_text(folder, prompts, max_sequence_length, torch_device))
    return out
