"""FLUX prompt encoding in JAX, as diffusers' `FluxPipeline.encode_prompt` builds it.

prompt_embeds [B, T, D_t5]: the T5 last hidden states (T = `max_sequence_length` tokens, 512 by default, as the
published FLUX-SwD samples with). pooled [B, D_clip]: CLIP-L's `pooler_output` (the final-LayerNorm state at
the EOS token; FLUX's `text_encoder` is a `CLIPTextModel`, no projection). No attention masks, as the pipeline.
The pipeline's `text_ids` are zeros [T, 3], which `swd_jax.models.flux.Flux` builds itself. FLUX-dev is
guidance-distilled: there is no negative prompt, so no unconditional embeddings here. Tokenizers are
transformers' `CLIPTokenizer` / `T5TokenizerFast` from the checkpoint folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.prompt_encoding import SD3PromptEncoder, TextModels, check_components, encode_tokens
from swd_jax.convert.strict import read_config
from swd_jax.convert.text import load_clip, load_t5
from swd_jax.models.text import CLIPTextModel, T5EncoderModel

COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxTextModels(NamedTuple):
    """CLIP-L (no projection) and T5 (hashable: usable as a static jit argument)."""

    clip_l: CLIPTextModel
    t5: T5EncoderModel


def encode_flux_tokens(models: FluxTextModels, params: dict, ids: dict) -> tuple[jax.Array, jax.Array]:
    """Token ids {'clip_l': [B, 77], 't5': [B, T]} -> (prompt_embeds [B, T, D_t5], pooled [B, D_clip])."""
    pooled = models.clip_l.apply({"params": params["clip_l"]}, ids["clip_l"])["pooler_output"]
    return models.t5.apply({"params": params["t5"]}, ids["t5"]), pooled


_encode_jit = jax.jit(encode_flux_tokens, static_argnums=0)


class FluxPromptEncoder:
    """FLUX's CLIP-L and T5 with their tokenizers, loaded from a diffusers FLUX folder; `encode_prompt`."""

    def __init__(self, folder: str, *, max_sequence_length: int = 512, dtype=jnp.float32,
                 param_dtype=jnp.float32, sharding: jax.sharding.Sharding | None = None):
        """`sharding`: where the parameters go (default: the default device), e.g. replicated over a mesh."""
        import transformers  # tokenizers only; not needed by the training loop

        check_components(folder, COMPONENTS, kind="FLUX")
        self.max_sequence_length = int(max_sequence_length)
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (FLUX's limit), got {max_sequence_length}")
        clip_folder = os.path.join(folder, "text_encoder")
        archs = read_config(clip_folder, where=f"CLIP text encoder {clip_folder}").get("architectures")
        if archs != ["CLIPTextModel"]:
            raise ValueError(f"{clip_folder}/config.json: architectures {archs}; FLUX's is a CLIPTextModel "
                             "(is this an SD3 folder?)")
        clip_l, clip_params = load_clip(clip_folder, dtype, param_dtype)
        t5, t5_params = load_t5(os.path.join(folder, "text_encoder_2"), dtype, param_dtype)
        self.models = FluxTextModels(clip_l, t5)
        tcfg_path = os.path.join(folder, "transformer", "config.json")
        if os.path.exists(tcfg_path):
            with open(tcfg_path) as f:
                tcfg = json.load(f)
            check_flux_widths(clip_l.config.hidden_size, t5.config.d_model, tcfg)
        self.params = jax.device_put({"clip_l": clip_params, "t5": t5_params}, sharding)
        self.tokenizers = {
            "clip_l": transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
            "t5": transformers.T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_2")),
        }
        self.clip_length = int(self.tokenizers["clip_l"].model_max_length)  # the pipeline's tokenizer_max_length
        if self.clip_length > clip_l.config.max_position_embeddings:
            raise ValueError(f"{folder}/tokenizer: model_max_length {self.clip_length} > CLIP "
                             f"max_position_embeddings {clip_l.config.max_position_embeddings}")

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Prompts -> int32 ids padded / truncated as the pipeline does (CLIP: 77, T5: max_sequence_length)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of str")
        prompts = list(prompts)
        clip = self.tokenizers["clip_l"](prompts, padding="max_length", max_length=self.clip_length,
                                         truncation=True, return_tensors="np").input_ids
        t5 = self.tokenizers["t5"](prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="np").input_ids
        return {"clip_l": np.asarray(clip, np.int32), "t5": np.asarray(t5, np.int32)}

    def encode_ids(self, ids: dict) -> tuple[jax.Array, jax.Array]:
        """Tokenized ids -> (prompt_embeds [B, T, D_t5], pooled [B, D_clip]) in float32 (jitted)."""
        return _encode_jit(self.models, self.params, ids)

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (prompt_embeds, pooled), equal to the pipeline's `encode_prompt(p)[0], [1]`."""
        return self.encode_ids(self.tokenize(prompts))


def is_flux_folder(folder: str) -> bool:
    """Whether a diffusers pipeline folder is FLUX's: its model_index.json (or transformer config) class says so."""
    for sub, name in (("", "model_index.json"), ("transformer", "config.json")):
        path = os.path.join(folder, sub, name)
        if os.path.exists(path):
            with open(path) as f:
                return str(json.load(f).get("_class_name", "")).startswith("Flux")
    return False


def load_prompt_encoder(folder: str, **kwargs) -> SD3PromptEncoder | FluxPromptEncoder:
    """The prompt encoder of a diffusers pipeline folder: FLUX's or SD3's (kwargs: max_sequence_length, dtypes,
    sharding)."""
    return (FluxPromptEncoder if is_flux_folder(folder) else SD3PromptEncoder)(folder, **kwargs)


def encode_any_tokens(models: FluxTextModels | TextModels, params: dict, ids: dict) -> tuple[jax.Array, jax.Array]:
    """`encode_flux_tokens` or SD3's `encode_tokens`, by the encoders' kind (traceable: use inside jit)."""
    return (encode_flux_tokens if isinstance(models, FluxTextModels) else encode_tokens)(models, params, ids)


def check_flux_widths(clip_width: int, t5_width: int, transformer_config: dict) -> None:
    """Raise ValueError unless CLIP-L / T5 widths are the transformer's pooled / joint attention widths."""
    joint, pooled = transformer_config.get("joint_attention_dim"), transformer_config.get("pooled_projection_dim")
    if joint != t5_width:
        raise ValueError(f"transformer joint_attention_dim={joint} but the T5 encoder width d_model={t5_width}")
    if pooled != clip_width:
        raise ValueError(f"transformer pooled_projection_dim={pooled} but the CLIP-L width hidden_size={clip_width}")
