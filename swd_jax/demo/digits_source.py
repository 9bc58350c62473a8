"""The trainer's data source for the digits problem (`data.kind="digits"`), registered on import.

Identity "VAE" (the 1-channel images are the latents), deterministic epoch permutations; sklearn's real digits,
or with `data.path` an npz of (images, labels), e.g. teacher-generated digits.
"""
from __future__ import annotations

import jax
import numpy as np

from swd_jax.demo.toy_data import ToyTextEncoder, area_down, digit_prompt, load_digits_images
from swd_jax.method.schedule import ScaleSchedule
from swd_jax.train.sources import register_source


class DigitsSource:
    """The toy digits problem; example j of the stream is perm_{epoch}[j mod N], perm seeded per epoch."""

    def __init__(self, schedule: ScaleSchedule, joint_dim: int, pooled_dim: int, global_batch: int, seed: int,
                 channels: int = 1, position: int = 0, path: str = ""):
        if channels != 1:
            raise ValueError(f"the digits source gives 1-channel latents; the model has in_channels={channels}")
        self.schedule, self.seed, self.global_batch, self.position = schedule, seed, global_batch, position
        if path:  # e.g. teacher-generated digits: npz with images [N, S, S, 1] and labels [N]
            with np.load(path) as z:
                self.images, self.labels = z["images"].astype(np.float32), z["labels"].astype(np.int32)
            if self.images.shape[1] < max(schedule.scales):
                raise ValueError(f"{path}: images are {self.images.shape[1]} px, the schedule needs "
                                 f"{max(schedule.scales)}")
            self.images = area_down(self.images, max(schedule.scales))
        else:
            self.images, self.labels = load_digits_images(max(schedule.scales))
        self.encoder = ToyTextEncoder(joint_dim, pooled_dim)
        self.class_context, self.class_pooled = self.encoder([digit_prompt(i) for i in range(10)])
        self.n_hosts, self.host = jax.process_count(), jax.process_index()
        if global_batch % self.n_hosts:
            raise ValueError(f"global batch {global_batch} not divisible by {self.n_hosts} hosts")

    def _indices(self, start: int, count: int) -> np.ndarray:
        epochs, rows = np.divmod(np.arange(start, start + count), len(self.labels))
        return np.array([self._perm(int(e))[r] for e, r in zip(epochs, rows)], np.int64)

    def _perm(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.labels)))
        return self._perm_cache[1]

    def batches(self, k: int, n: int) -> dict[str, np.ndarray]:
        per_host = self.global_batch // self.n_hosts
        out = []
        for _ in range(n):
            idx = self._indices(self.position + self.host * per_host, per_host)
            self.position += self.global_batch
            out.append(self.examples(idx, k))
        return {key: np.stack([b[key] for b in out]) for key in out[0]}

    def examples(self, idx: np.ndarray, k: int) -> dict[str, np.ndarray]:
        x = area_down(self.images[idx], self.schedule.scale(k))
        return {"x": x, "x_prev": area_down(x, self.schedule.prev_scale(k)),
                "context": self.class_context[self.labels[idx]], "pooled": self.class_pooled[self.labels[idx]]}

    def uncond(self) -> dict[str, np.ndarray]:
        context, pooled = self.encoder([""])
        return {"context": context, "pooled": pooled}

    def validation_cond(self, n: int) -> dict[str, np.ndarray]:
        """Prompts "a handwritten digit zero", "... one", ... (cycling) for validation grids."""
        labels = np.arange(n) % 10
        return {"context": self.class_context[labels], "pooled": self.class_pooled[labels]}


def _make(c, schedule: ScaleSchedule, transformer_config, position: int = 0, devices=None) -> DigitsSource:
    return DigitsSource(schedule, transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim,
                        c.train.batch_size, c.data.seed, transformer_config.latent_channels, position, c.data.path)


register_source("digits", _make)
