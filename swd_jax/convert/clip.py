"""A transformers `CLIPModel` folder (config.json + model*.safetensors) -> `CLIPConfig` and Flax params, strictly.

For the scorers: laion/CLIP-ViT-H-14-laion2B-s32B-b79K and yuvalkirstain/PickScore_v1. Keys map module for
module (`vision_model.encoder.layers.3.mlp.fc1.weight` -> `vision_model/encoder/layers_3/mlp/fc1/kernel`);
`vision_model.embeddings.class_embedding` and `logit_scale` are bare parameters. Older configs (transformers
4.2x, as the laion one) serialise every generic `PretrainedConfig` field into `text_config`/`vision_config`
and keep overrides in `text_config_dict`/`vision_config_dict`: the generic fields are ignored, the overrides
applied (as `CLIPConfig.__init__` does), anything else unknown raises.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.strict import (abstract_params, check_fields, convert_tensors, identity, read_config, require,
                                    table_rename)
from swd_jax.convert.text import _CLIP_DEFAULTS as _TEXT_DEFAULTS
from swd_jax.convert.text import _META, CLIP_LEAF_KINDS
from swd_jax.models.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig
from swd_jax.models.text import CLIP_ACTIVATIONS, CLIPTextConfig

LEAF_KINDS = {**CLIP_LEAF_KINDS, "patch_embedding": "conv", "pre_layrnorm": "norm", "post_layernorm": "norm",
              "visual_projection": "linear"}
BARE = {"vision_model.embeddings.class_embedding": ("vision_model", "embeddings", "class_embedding"),
        "logit_scale": ("logit_scale",)}

_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Generic PretrainedConfig fields older transformers wrote into every sub-config: generation, heads, export.
_GENERIC = ("add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
            "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
            "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
            "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
            "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
            "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "prefix", "problem_type",
            "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
            "sep_token_id", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
            "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "typical_p", "use_bfloat16",
            "projection_dim")  # a sub-config's own projection_dim: CLIPModel uses the top-level one
_TOP_USED = ("text_config", "vision_config", "text_config_dict", "vision_config_dict", "projection_dim")
_TOP_IGNORED = _META + _GENERIC + ("logit_scale_init_value",)  # init only: the checkpoint holds logit_scale


_TABLE = table_rename(LEAF_KINDS)


def _merged(raw: dict, name: str) -> dict:
    return {**(raw.get(f"{name}_config") or {}), **(raw.get(f"{name}_config_dict") or {})}


def clip_model_config_from_dict(raw: dict, where: str = "config.json") -> CLIPConfig:
    """A transformers CLIPConfig dict -> CLIPConfig; unsupported fields or values raise."""
    check_fields(raw, used=_TOP_USED, ignored=_TOP_IGNORED, where=where)
    require(raw.get("model_type", "clip") == "clip", where, f"model_type {raw.get('model_type')!r}, expected 'clip'")
    archs = raw.get("architectures") or ["CLIPModel"]
    require(archs == ["CLIPModel"], where, f"architectures {archs} (a scorer is a CLIPModel)")
    text, vision = _merged(raw, "text"), _merged(raw, "vision")
    check_fields(text, used=_TEXT_DEFAULTS, ignored=_META + _GENERIC, where=f"{where} text_config")
    check_fields(vision, used=_VISION_DEFAULTS, ignored=_META + _GENERIC, where=f"{where} vision_config")
    require(text.get("model_type", "clip_text_model") == "clip_text_model", where, "text_config.model_type")
    require(vision.get("model_type", "clip_vision_model") == "clip_vision_model", where, "vision_config.model_type")
    t, v = {**_TEXT_DEFAULTS, **text}, {**_VISION_DEFAULTS, **vision}
    for side, c in (("text", t), ("vision", v)):
        require(c["hidden_act"] in CLIP_ACTIVATIONS, where, f"{side} hidden_act {c['hidden_act']!r}")
    require(isinstance(t["eos_token_id"], int), where, f"text eos_token_id {t['eos_token_id']!r} (one int)")
    proj = raw.get("projection_dim", 512)
    return CLIPConfig(text=CLIPTextConfig(**{**{k: t[k] for k in _TEXT_DEFAULTS}, "projection_dim": proj}),
                      vision=CLIPVisionConfig(**{k: v[k] for k in _VISION_DEFAULTS}), projection_dim=proj)


def rename(key: str):
    """A CLIPModel key -> (our param path, transform); None for keys no rule maps."""
    if key in BARE:
        return BARE[key], identity
    return _TABLE(key)


def _position_ids_ok(a: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).reshape(-1), np.arange(a.size))


def load_clip_model(folder: str, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[CLIPModel, dict]:
    """(model, params as numpy) from a transformers CLIPModel folder with safetensors weights; strict."""
    where = f"CLIP model {folder}"
    config = clip_model_config_from_dict(read_config(folder, where=where), where=os.path.join(folder, "config.json"))
    model = CLIPModel(config, dtype=dtype, param_dtype=param_dtype)
    s = config.vision.image_size
    abstract = abstract_params(model, jnp.zeros((1, s, s, config.vision.num_channels)), jnp.zeros((1, 2), jnp.int32))
    buffers = {f"{t}_model.embeddings.position_ids": _position_ids_ok for t in ("text", "vision")}
    params = convert_tensors(SafetensorsFolder(folder, prefix="model"), rename, abstract, where=where,
                             buffers=buffers)
    return model, params
