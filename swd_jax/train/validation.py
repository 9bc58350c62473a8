"""Validation images during training: the student's scale-wise samples for fixed prompts, saved as a PNG grid."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax import storage
from swd_jax.convert.converted import META, conversion_source
from swd_jax.convert.folders import from_hub
from swd_jax.method.sampler import scale_wise_sample


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
