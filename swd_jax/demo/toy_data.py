"""The built-in default problem: scikit-learn's 1,797 real handwritten digits as a tiny text-to-image task.

No download and no accelerator: the 8x8 digits ship with scikit-learn. Images are upsampled (torch-exact
bicubic) to the largest latent size and used directly as 1-channel "latents" (the identity stands in for the
VAE). Prompts are "a handwritten digit seven"; a frozen, seeded word-embedding encoder of ours (`ToyTextEncoder`)
turns them into SD3-shaped (context [B, T, J], pooled [B, P]) embeddings, the empty prompt giving the
unconditional ones.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from swd_jax.method.resize import area_matrix, bicubic_matrix

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


@dataclasses.dataclass(frozen=True)
class ToyTextEncoder:
    """Frozen seeded word embeddings: context = E[tokens] (padded to `max_tokens`), pooled = P^T mean(E[tokens])."""
    joint_dim: int
    pooled_dim: int
    max_tokens: int = 6
    seed: int = 1234

    @property
    def vocab(self) -> tuple[str, ...]:
        return ("<pad>", "a", "handwritten", "digit") + DIGIT_WORDS

    def tokenize(self, prompt: str) -> np.ndarray:
        index = {w: i for i, w in enumerate(self.vocab)}
        words = prompt.lower().split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(f"words {unknown} are not in the toy vocabulary {self.vocab[1:]}")
        if len(words) > self.max_tokens:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words, the toy encoder takes {self.max_tokens}")
        ids = np.zeros(self.max_tokens, np.int32)
        ids[:len(words)] = [index[w] for w in words]
        return ids

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        table = rng.standard_normal((len(self.vocab), self.joint_dim)).astype(np.float32)
        table[0] = 0.0
        proj = (rng.standard_normal((self.joint_dim, self.pooled_dim)) / np.sqrt(self.joint_dim)).astype(np.float32)
        ids = np.stack([self.tokenize(p) for p in prompts])
        context = table[ids]
        n = np.maximum((ids > 0).sum(1, keepdims=True), 1)
        pooled = (context.sum(1) / n) @ proj
        return context, pooled.astype(np.float32)


def load_digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, size, size, 1] float32 in [-1, 1], labels [N]) from sklearn's bundled digits."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    m = bicubic_matrix(8, size) if size > 8 else area_matrix(8, size)
    x = np.einsum("hH,nHW,wW->nhw", m, x, m)
    return np.clip(x, -1.0, 1.0)[..., None].astype(np.float32), d.target.astype(np.int32)


def area_down(x_NHWC: np.ndarray, size: int) -> np.ndarray:
    """torch-exact area downscale on host numpy arrays (identity when the size is unchanged)."""
    if x_NHWC.shape[1] == size:
        return x_NHWC
    m = area_matrix(x_NHWC.shape[1], size)
    return np.einsum("hH,nHWc,wW->nhwc", m, x_NHWC, m).astype(x_NHWC.dtype)
