"""transformers text-encoder folders (config.json + model*.safetensors) -> configs and Flax params.

`text_encoder/`, `text_encoder_2/` (CLIPTextModelWithProjection: CLIP-L, CLIP-G) -> `CLIPTextModelWithProjection`;
FLUX's `text_encoder/` (CLIPTextModel: CLIP-L, no projection) -> `CLIPTextModel`;
`text_encoder_3/` (T5EncoderModel, v1.1) -> `T5EncoderModel`. Keys map module for module
(`text_model.encoder.layers.3.self_attn.q_proj.weight` -> `text_model/encoder/layers_3/self_attn/q_proj/kernel`);
the tables below say which last module names are linears, norms and embeddings. T5's
`encoder.embed_tokens.weight` is the tied copy of `shared.weight` (must be equal when both are present).
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.strict import abstract_params, check_fields, convert_tensors, read_config, require, table_rename
from swd_jax.models.text import (CLIP_ACTIVATIONS, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 T5Config, T5EncoderModel)

CLIP_LEAF_KINDS = {
    "token_embedding": "embedding", "position_embedding": "embedding",
    "q_proj": "linear", "k_proj": "linear", "v_proj": "linear", "out_proj": "linear",
    "fc1": "linear", "fc2": "linear", "text_projection": "linear",
    "layer_norm1": "norm", "layer_norm2": "norm", "final_layer_norm": "norm",
}
T5_LEAF_KINDS = {
    "shared": "embedding", "relative_attention_bias": "embedding",
    "q": "linear", "k": "linear", "v": "linear", "o": "linear", "wi_0": "linear", "wi_1": "linear", "wo": "linear",
    "layer_norm": "norm", "final_layer_norm": "norm",
}
T5_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}  # tied embedding, saved by some transformers

# Fields transformers writes that do not change the forward pass of an inference-only encoder.
_META = ("_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
         "_commit_hash", "_attn_implementation_autoset", "bos_token_id", "pad_token_id", "use_cache", "output_past",
         "return_dict", "output_hidden_states", "output_attentions", "torchscript", "tie_word_embeddings",
         "initializer_range", "initializer_factor", "attention_dropout", "dropout", "dropout_rate",
         "classifier_dropout")

# transformers CLIPTextConfig / T5Config defaults, for fields a config.json leaves out.
_CLIP_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    layer_norm_epsilon=1e-6, feed_forward_proj="relu")
_T5_EXTRA_USED = ("dense_act_fn", "is_gated_act", "is_decoder", "is_encoder_decoder", "num_decoder_layers",
                  "scale_decoder_outputs",  # decoder-side only
                  "decoder_start_token_id", "eos_token_id", "n_positions", "task_specific_params")


def clip_config_from_dict(raw: dict, where: str = "text_encoder/config.json") -> CLIPTextConfig:
    """A transformers CLIPTextConfig dict -> CLIPTextConfig; unsupported fields or values raise."""
    check_fields(raw, used=_CLIP_DEFAULTS, ignored=_META, where=where)
    require(raw.get("model_type", "clip_text_model") == "clip_text_model", where,
            f"model_type {raw.get('model_type')!r}, expected 'clip_text_model'")
    archs = raw.get("architectures") or ["CLIPTextModelWithProjection"]
    require(archs in (["CLIPTextModelWithProjection"], ["CLIPTextModel"]), where,
            f"architectures {archs} (SD3 needs CLIPTextModelWithProjection, FLUX CLIPTextModel)")
    c = {**_CLIP_DEFAULTS, **raw}
    require(c["hidden_act"] in CLIP_ACTIVATIONS, where, f"hidden_act {c['hidden_act']!r}")
    require(isinstance(c["eos_token_id"], int), where, f"eos_token_id {c['eos_token_id']!r} (one int)")
    return CLIPTextConfig(**{k: c[k] for k in _CLIP_DEFAULTS})


def t5_config_from_dict(raw: dict, where: str = "text_encoder_3/config.json") -> T5Config:
    """A transformers T5Config dict (v1.1: gated-gelu) -> T5Config; unsupported fields or values raise."""
    check_fields(raw, used=tuple(_T5_DEFAULTS) + _T5_EXTRA_USED, ignored=_META, where=where)
    require(raw.get("model_type", "t5") == "t5", where, f"model_type {raw.get('model_type')!r}, expected 't5'")
    c = {**_T5_DEFAULTS, **raw}
    require(c["feed_forward_proj"] == "gated-gelu", where,
            f"feed_forward_proj {c['feed_forward_proj']!r} (T5 v1.1 'gated-gelu' only)")
    require(c.get("dense_act_fn", "gelu_new") == "gelu_new" and c.get("is_gated_act", True) is True, where,
            f"dense_act_fn {c.get('dense_act_fn')!r} / is_gated_act {c.get('is_gated_act')!r} "
            "(gated-gelu means gelu_new, gated)")
    require(not c.get("is_decoder", False), where, "is_decoder true (we port the encoder only)")
    return T5Config(**{k: c[k] for k in _T5_DEFAULTS if k != "feed_forward_proj"})


def _position_ids_ok(a: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).reshape(-1), np.arange(a.size))


def load_clip(folder: str, dtype=jnp.float32,
              param_dtype=jnp.float32) -> tuple[CLIPTextModelWithProjection | CLIPTextModel, dict]:
    """(model, params as numpy) from a transformers CLIPTextModelWithProjection (SD3) or CLIPTextModel (FLUX)
    folder, the class as its config.json's `architectures` says; strict."""
    where = f"CLIP text encoder {folder}"
    raw = read_config(folder, where=where)
    config = clip_config_from_dict(raw, where=os.path.join(folder, "config.json"))
    with_projection = (raw.get("architectures") or ["CLIPTextModelWithProjection"]) != ["CLIPTextModel"]
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config, dtype=dtype,
                                                                                param_dtype=param_dtype)
    abstract = abstract_params(model, jnp.zeros((1, 2), jnp.int32))
    table = table_rename(CLIP_LEAF_KINDS)
    # transformers >= 5 saves a CLIPTextModel without the `text_model.` prefix that published FLUX files have
    rename = table if with_projection else lambda k: table(k if k.startswith("text_model.") else "text_model." + k)
    params = convert_tensors(SafetensorsFolder(folder, prefix="model"), rename, abstract, where=where,
                             buffers={"text_model.embeddings.position_ids": _position_ids_ok,
                                      "embeddings.position_ids": _position_ids_ok})
    return model, params


def load_t5(folder: str, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[T5EncoderModel, dict]:
    """(model, params as numpy) from a transformers T5EncoderModel folder; strict."""
    where = f"T5 encoder {folder}"
    config = t5_config_from_dict(read_config(folder, where=where), where=os.path.join(folder, "config.json"))
    model = T5EncoderModel(config, dtype=dtype, param_dtype=param_dtype)
    abstract = abstract_params(model, jnp.zeros((1, 2), jnp.int32))
    table = table_rename(T5_LEAF_KINDS)
    params = convert_tensors(SafetensorsFolder(folder, prefix="model"), lambda k: table(T5_ALIASES.get(k, k)),
                             abstract, where=where)
    return model, params
