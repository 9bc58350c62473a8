"""SD3 prompt encoding in JAX, as diffusers' `StableDiffusion3Pipeline.encode_prompt` builds it (METHOD.md sec. 6).

prompt_embeds [B, 77 + T, D_t5]: CLIP-L and CLIP-G penultimate hidden states (77 tokens) concatenated on the
feature axis and zero-padded to the T5 width, then the T5 last hidden states (T = `max_sequence_length`
tokens, 256 by default) joined on the token axis. pooled [B, 768 + 1280]: the two CLIP projected pooled
outputs. No attention masks, as the pipeline (padding tokens are encoded like any others). The
unconditional embeddings are those of the empty prompt. Tokenizers are transformers' `CLIPTokenizer` /
`T5TokenizerFast` from the checkpoint folder (so this module imports transformers; the training loop only
reads precomputed embeddings).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.text import load_clip, load_t5
from swd_jax.models.text import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def check_components(folder: str, components: Sequence[str] = COMPONENTS, kind: str = "SD3") -> None:
    """Raise FileNotFoundError naming every missing sub-folder of a diffusers `kind` checkpoint folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{kind} checkpoint folder {folder} does not exist")
    missing = [c for c in components if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise FileNotFoundError(f"{kind} checkpoint folder {folder} lacks component folder(s) {missing}")


def check_widths(clip_l: CLIPTextConfig, clip_g: CLIPTextConfig, t5: T5Config,
                 transformer_config: dict | None = None) -> None:
    """Raise ValueError unless the encoders' widths fit each other and the transformer's joint/pooled widths."""
    clip_width = clip_l.hidden_size + clip_g.hidden_size
    if clip_width > t5.d_model:
        raise ValueError(f"CLIP-L + CLIP-G hidden sizes {clip_l.hidden_size} + {clip_g.hidden_size} = {clip_width} "
                         f"exceed the T5 width d_model={t5.d_model} they are zero-padded to")
    if transformer_config is None:
        return
    joint, pooled = transformer_config.get("joint_attention_dim"), transformer_config.get("pooled_projection_dim")
    if joint != t5.d_model:
        raise ValueError(f"transformer joint_attention_dim={joint} but the T5 encoder width d_model={t5.d_model}")
    if pooled != clip_l.projection_dim + clip_g.projection_dim:
        raise ValueError(f"transformer pooled_projection_dim={pooled} but CLIP-L + CLIP-G projection_dim = "
                         f"{clip_l.projection_dim} + {clip_g.projection_dim}")


class TextModels(NamedTuple):
    """The three encoders (hashable: usable as a static jit argument)."""

    clip_l: CLIPTextModelWithProjection
    clip_g: CLIPTextModelWithProjection
    t5: T5EncoderModel


def encode_tokens(models: TextModels, params: dict, ids: dict) -> tuple[jax.Array, jax.Array]:
    """Token ids {'clip_l', 'clip_g': [B, 77], 't5': [B, T]} -> (prompt_embeds [B, 77 + T, D_t5], pooled)."""
    out_l = models.clip_l.apply({"params": params["clip_l"]}, ids["clip_l"])
    out_g = models.clip_g.apply({"params": params["clip_g"]}, ids["clip_g"])
    t5_BTD = models.t5.apply({"params": params["t5"]}, ids["t5"])
    clip_BLC = jnp.concatenate([out_l["hidden_states"][-2], out_g["hidden_states"][-2]], axis=-1)
    clip_BLD = jnp.pad(clip_BLC, ((0, 0), (0, 0), (0, t5_BTD.shape[-1] - clip_BLC.shape[-1])))
    prompt_embeds = jnp.concatenate([clip_BLD, t5_BTD], axis=1)
    pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
    return prompt_embeds, pooled


_encode_jit = jax.jit(encode_tokens, static_argnums=0)  # one compile per (models, shapes), across instances


class SD3PromptEncoder:
    """CLIP-L, CLIP-G and T5 with their tokenizers, loaded from a diffusers SD3 folder; `encode_prompt`."""

    def __init__(self, folder: str, *, max_sequence_length: int = 256, dtype=jnp.float32,
                 param_dtype=jnp.float32, sharding: jax.sharding.Sharding | None = None):
        """`sharding`: where the parameters go (default: the default device), e.g. replicated over a mesh."""
        import transformers  # tokenizers only; not needed by the training loop

        check_components(folder)
        self.max_sequence_length = int(max_sequence_length)
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        models, params = {}, {}
        for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            models[name], params[name] = load_clip(os.path.join(folder, sub), dtype, param_dtype)
        models["t5"], params["t5"] = load_t5(os.path.join(folder, "text_encoder_3"), dtype, param_dtype)
        self.models = TextModels(**models)
        tcfg_path = os.path.join(folder, "transformer", "config.json")
        tcfg = None
        if os.path.exists(tcfg_path):
            with open(tcfg_path) as f:
                tcfg = json.load(f)
        check_widths(self.models.clip_l.config, self.models.clip_g.config, self.models.t5.config, tcfg)
        self.params = jax.device_put(params, sharding)
        self.tokenizers = {
            "clip_l": transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
            "clip_g": transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")),
            "t5": transformers.T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_3")),
        }
        self.clip_length = int(self.tokenizers["clip_l"].model_max_length)  # the pipeline's tokenizer_max_length
        for name in ("clip_l", "clip_g"):
            n_pos = getattr(self.models, name).config.max_position_embeddings
            if self.clip_length > n_pos:
                raise ValueError(f"{name}: tokenizer length {self.clip_length} > max_position_embeddings {n_pos}")

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Prompts -> int32 ids padded / truncated as the pipeline does (CLIP: 77, T5: max_sequence_length)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of str")
        prompts = list(prompts)
        ids = {}
        for name in ("clip_l", "clip_g"):
            ids[name] = self.tokenizers[name](prompts, padding="max_length", max_length=self.clip_length,
                                              truncation=True, return_tensors="np").input_ids
        ids["t5"] = self.tokenizers["t5"](prompts, padding="max_length", max_length=self.max_sequence_length,
                                          truncation=True, add_special_tokens=True, return_tensors="np").input_ids
        return {k: np.asarray(v, np.int32) for k, v in ids.items()}

    def encode_ids(self, ids: dict) -> tuple[jax.Array, jax.Array]:
        """Tokenized ids -> (prompt_embeds [B, 77 + T, D_t5], pooled [B, D_l + D_g]) in float32 (jitted)."""
        return _encode_jit(self.models, self.params, ids)

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (prompt_embeds, pooled), equal to the pipeline's `encode_prompt(p, p, p)[0], [2]`."""
        return self.encode_ids(self.tokenize(prompts))

    def unconditional(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        """Embeddings of the empty prompt (the pipeline's negative prompt default), repeated batch_size times."""
        embeds, pooled = self.encode_prompt([""])
        return (jnp.repeat(embeds, batch_size, axis=0), jnp.repeat(pooled, batch_size, axis=0))
