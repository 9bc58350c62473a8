"""diffusers FluxTransformer2DModel folder (safetensors, one file or sharded, any dtype) -> our Flux params.

The rule table is three lines: the RMS qk-norms' `weight` -> `scale`, every other `weight` is a Linear
(transposed to a kernel), `bias` -> `bias`; module paths follow `models.names`. Tensors are read one at a time
from memory-mapped files (`SafetensorsFolder`) and cast to the target dtype, and `convert.strict.convert_tensors`
checks every key and shape against the abstract init of our module: unknown, unplaced, missing and mis-shaped
tensors raise, all named. With `shardings`, each tensor goes straight onto its device shards.
"""
from __future__ import annotations

from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.strict import convert_tensors, identity, linear_to_kernel, module_path
from swd_jax.models.backbone import backbone_of
from swd_jax.models.flux import FluxConfig

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def rename(key: str):
    """`single_transformer_blocks.0.attn.norm_q.weight` -> (("single_transformer_blocks_0", "attn", "norm_q",
    "scale"), identity); Linear weights -> kernel (transposed); None for anything else."""
    *mods, leaf = key.split(".")
    if not mods:
        return None
    path = module_path(mods)
    if leaf == "weight":
        return (path + ("scale",), identity) if path[-1] in QK_NORMS else (path + ("kernel",), linear_to_kernel)
    if leaf == "bias":
        return path + ("bias",), identity
    return None


class _Tensors:
    """A dict of arrays seen as a SafetensorsFolder (`keys`, `get`), for in-memory state dicts."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def keys(self):
        return list(self._t.keys())

    def get(self, key):
        return np.asarray(self._t[key])


def convert_state_dict(tensors: Mapping[str, np.ndarray] | SafetensorsFolder, cfg: FluxConfig, dtype=jnp.float32,
                       shardings: dict | None = None) -> dict:
    """diffusers tensors (a dict or a SafetensorsFolder) -> our Flux params pytree (jax arrays), strictly checked."""
    st = tensors if isinstance(tensors, SafetensorsFolder) else _Tensors(tensors)
    flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}

    def place(path, arr):
        return jax.device_put(arr, flat_shardings[path]) if path in flat_shardings else jnp.asarray(arr)

    abstract = backbone_of(cfg).abstract_params(cfg, dtype)
    return convert_tensors(st, rename, abstract, where="FluxTransformer2DModel", place=place)
