"""CLIP score and PickScore as the official code computes them (yandex-research/swd `calc_pick_and_clip_scores`).

Per (image, prompt) pair: cos(image_embeds, text_embeds) of a `CLIPModel` (L2-normalised
`get_image_features` and `get_text_features`, summed product) -- no logit scale, no x100, no clipping at 0;
the metric is the mean over pairs. Both models take the inputs of one processor, laion/CLIP-ViT-H-14's:
images through `image_chain.clip_input` (after the official 512 px resize), prompts tokenised with
`padding, truncation, max_length=77`. We pad every prompt to 77 tokens (one compiled shape); with CLIP's causal
mask and the padding mask the EOS embedding does not depend on the padding length. The official code runs under
CUDA fp16 autocast; we compute in float32.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.clip import load_clip_model
from swd_jax.eval.image_chain import ClipPreprocess

MAX_LENGTH = 77


def cosine_scores(model, params, pixels_BHWC: jax.Array, ids_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """[B] cos(image, text) of a CLIPModel: `calc_pick_and_clip_scores`'s per-pair score."""
    image = model.apply({"params": params}, pixels_BHWC, method=model.get_image_features)
    text = model.apply({"params": params}, ids_BL, mask_BL, method=model.get_text_features)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return jnp.sum(text * image, axis=-1)


def load_tokenizer(folder: str):
    """The CLIP tokenizer of a transformers model folder (its `tokenizer*`/`vocab.json`/`merges.txt` files)."""
    import transformers  # tokenizers only
    try:
        return transformers.CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"no CLIP tokenizer in {folder} (vocab.json + merges.txt); pass the laion "
                                f"CLIP-ViT-H-14 folder as the processor: {e}") from e


def tokenize(tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, 77] int32, attention mask [N, 77] int32), truncated and padded to 77 tokens."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


class ClipScorer:
    """A CLIPModel scorer (CLIP ViT-H-14 or PickScore_v1) with jitted fixed-size batches.

    `score(pixels, ids, mask)` -> [N] float64 cosines; inputs come from `image_chain.clip_input` and
    `tokenize`, made once and shared by every scorer (as the official code shares its processor's output).
    """

    def __init__(self, folder: str, batch_size: int = 8):
        self.model, params = load_clip_model(folder)
        self.params = jax.device_put(params)
        self.batch_size = batch_size
        self.name = os.path.basename(os.path.normpath(folder))
        self._score = jax.jit(lambda p, x, i, m: cosine_scores(self.model, p, x, i, m))

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def check_preprocess(self, pre: ClipPreprocess) -> None:
        """Raise if the shared preprocessing does not produce this model's input size."""
        if pre.crop_size != self.image_size:
            raise ValueError(f"CLIP scorer {self.name}: preprocessing crops {pre.crop_size} px but the model "
                             f"takes {self.image_size} px")

    def score(self, pixels_NHWC: np.ndarray, ids_NL: np.ndarray, mask_NL: np.ndarray) -> np.ndarray:
        n = len(pixels_NHWC)
        if not n == len(ids_NL) == len(mask_NL):
            raise ValueError(f"CLIP scorer: {n} images but {len(ids_NL)} prompts")
        out = []
        for s in range(0, n, self.batch_size):
            x, i, m = pixels_NHWC[s:s + self.batch_size], ids_NL[s:s + self.batch_size], mask_NL[s:s + self.batch_size]
            k = len(x)
            if k < self.batch_size:  # pad with copies of the first pair: one program for every batch
                pad = self.batch_size - k
                x, i, m = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (x, i, m))
            out.append(np.asarray(self._score(self.params, x, i, m), np.float64)[:k])
        return np.concatenate(out) if out else np.zeros(0)
