"""Validation images during training: the student's scale-wise samples for fixed prompts, saved as a PNG grid."""
from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax import storage
from swd_jax.convert.converted import META, conversion_source
from swd_jax.convert.folders import from_hub
from swd_jax.sampler import scale_wise_sample


def source_vae_folder(model_source: str, model_path: str) -> str | None:
    """The vae/ folder to decode validation latents with: MODEL/vae, or for a converted checkpoint the vae/ beside
    the transformer folder its conversion.json names as "source" (the pipeline it was converted from); else None.
    Local or gs:// (then the folder returned is a cached local copy)."""
    if not model_path:
        return None
    model_path = from_hub(model_path, ("vae",), "model.path")  # a Hub id: its snapshot (vae/ only)
    candidates = [storage.join(model_path, "vae")]
    meta = storage.join(model_path, META)
    if model_source in ("converted", "auto") and storage.isfile(meta):
        src = conversion_source(model_path)
        if src:
            candidates.append(storage.join(storage.parent(src.rstrip("/")), "vae"))
    found = next((d for d in candidates if storage.isdir(d)), None)
    return None if found is None else storage.local_copy(found, what="VAE folder")  # gs://: a local copy


def image_grid(images_NHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, C] floats in [-1, 1] (or uint8) -> one uint8 [rows*H, cols*W, 3] grid (1 channel as grey)."""
    x = np.asarray(images_NHWC)
    if x.dtype != np.uint8:
        x = np.clip((x.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
    n, h, w, _ = x.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    return grid


def save_png(path: str, grid_HW3: np.ndarray, min_size: int = 256):
    """Write a grid as PNG, upscaled (nearest) so that tiny images stay visible."""
    from PIL import Image
    img = Image.fromarray(grid_HW3)
    if max(img.size) < min_size:
        f = int(np.ceil(min_size / max(img.size)))
        img = img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


class StudentSampler:
    """Scale-wise samples of base + LoRA for fixed conditioning; one velocity function, so no recompiles."""

    def __init__(self, mmdit, schedule, channels: int, decode: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
                 guidance: float | None = None):
        """`mmdit`: the transformer (MMDiT or Flux); `guidance`: FLUX-dev's embedded guidance scale, else None."""
        self.schedule, self.channels = schedule, channels
        self.decode = decode or (lambda x: x)

        def velocity(params, x_BHWC, t_B, cond):
            extra = {} if guidance is None else {"guidance_B": jnp.full(t_B.shape, guidance, jnp.float32)}
            return mmdit.apply({"params": params["base"], "lora": params["lora"]}, x_BHWC, t_B,
                               cond["context"], cond["pooled"], **extra)

        self.velocity = velocity

    def __call__(self, base, lora, cond: dict, seed: int = 0) -> np.ndarray:
        n = cond["context"].shape[0]
        x0 = scale_wise_sample(self.velocity, {"base": base, "lora": lora}, cond, jax.random.key(seed),
                               self.schedule, batch_size=n, channels=self.channels)
        return np.asarray(jax.device_get(self.decode(x0)))
