"""diffusers SD3Transformer2DModel folder (safetensors, one file or sharded) -> our MMDiT params.

One declarative rule table maps each diffusers key to (our path, transform). Tensors are read one at a time from
memory-mapped files and converted straight to the target dtype (and, if given, onto their device shards), so the
host never holds two copies of the model. Every shape is checked against the abstract init of our module;
unknown and missing keys raise with their names.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.models.backbone import DIFFUSERS_CLASSES, backbone_of
from swd_jax.models.mmdit import MMDiTConfig
from swd_jax.models.names import diffusers_to_our


def _conv_to_patch_matmul(w_DCpq: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [D, C, p, p] -> our patch-matmul kernel [p*p*C, D] (patches flattened (row, col, C))."""
    d, c, p, q = w_DCpq.shape
    return w_DCpq.transpose(2, 3, 1, 0).reshape(p * q * c, d)


def _transpose(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {w.shape}")
    return w.T


def _same(w: np.ndarray) -> np.ndarray:
    return w


# (pattern on the diffusers key, replacement of the leaf name, transform); the first match wins.
RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"^pos_embed\.pos_embed$", "pos_embed", _same),
    (r"^pos_embed\.proj\.weight$", "kernel", _conv_to_patch_matmul),
    (r"\.norm_(q|k|added_q|added_k)\.weight$", "scale", _same),
    (r"\.weight$", "kernel", _transpose),
    (r"\.bias$", "bias", _same),
]


def diffusers_key_to_ours(key: str) -> tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]:
    """`transformer_blocks.0.attn.to_q.weight` -> (("transformer_blocks_0", "attn", "to_q", "kernel"), transpose)."""
    for pattern, leaf, fn in RULES:
        if re.search(pattern, key):
            module, _ = key.rsplit(".", 1)
            return tuple(diffusers_to_our(module).split("/")) + (leaf,), fn
    raise KeyError(f"no conversion rule for diffusers key {key!r}")


def convert_state_dict(tensors: Mapping[str, np.ndarray] | SafetensorsFolder, cfg: MMDiTConfig,
                       dtype=jnp.float32, shardings: dict | None = None) -> dict:
    """diffusers tensors (a dict or a SafetensorsFolder) -> our params pytree, strictly checked.

    `shardings`, if given, is a pytree like the params of `jax.sharding.Sharding`s: each tensor goes straight
    to its shards, so host memory holds one tensor at a time.
    """
    abstract = flax.traverse_util.flatten_dict(backbone_of(cfg).abstract_params(cfg, dtype))
    flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
    keys = list(tensors.keys())
    get = tensors.get if isinstance(tensors, SafetensorsFolder) else tensors.__getitem__
    out, unknown, problems = {}, [], []
    for key in keys:
        try:
            path, fn = diffusers_key_to_ours(key)
        except KeyError:
            unknown.append(key)
            continue
        if path not in abstract:
            unknown.append(key)
            continue
        value = fn(np.asarray(get(key)))
        want = abstract[path].shape
        if value.shape != want:
            problems.append(f"{key}: checkpoint shape {tuple(get(key).shape)} -> {value.shape}, model expects {want}")
            continue
        value = np.asarray(value, dtype=dtype)
        out[path] = jax.device_put(value, flat_shardings[path]) if path in flat_shardings else jnp.asarray(value)
    missing = sorted("/".join(p) for p in abstract if p not in out)
    errors = []
    if unknown:
        errors.append(f"unknown keys (not in an SD3 transformer with this config): {sorted(unknown)}")
    if problems:
        errors.append("shape mismatches: " + "; ".join(problems))
    if missing:
        errors.append(f"missing weights (our param paths): {missing}")
    if errors:
        raise ValueError("checkpoint does not match the SD3Transformer2DModel config:\n  " + "\n  ".join(errors))
    return flax.traverse_util.unflatten_dict(out)


def transformer_folder(path: str) -> str:
    """A diffusers transformer folder, or a pipeline folder (model_index.json) -> its transformer folder."""
    if os.path.exists(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "transformer")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"pipeline folder {os.path.dirname(path)} has no transformer/ subfolder")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is neither a diffusers transformer folder (config.json + safetensors) "
                                "nor a pipeline folder (model_index.json + transformer/)")
    return path


def transformer_class(folder: str) -> str:
    """`_class_name` of a transformer folder's config.json (SD3Transformer2DModel when absent); others raise."""
    import json
    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name", "SD3Transformer2DModel")
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"{folder}: transformer class {name!r} is not supported; expected one of "
                         f"{DIFFUSERS_CLASSES}")
    return name
