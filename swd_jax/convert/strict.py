"""Strict, table-driven conversion of diffusers/transformers safetensors and config.json into Flax params.

A converter is a rename function `torch_key -> (our_param_path, transform)` built from a small declarative
table (`leaf_kinds`: the last module name of a key -> conv / linear / norm / embedding), applied to every
tensor of a `SafetensorsFolder` and checked against the model's abstract parameters (`jax.eval_shape`):
an unmapped key, a key mapped to no parameter, a parameter no key fills, or a shape mismatch raises one
error that names every offender. Two keys may fill one parameter only if their tensors are equal (tied
embeddings). Config files are read the same way: fields not explicitly used or ignored raise.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from swd_jax.models.names import diffusers_to_our
from swd_jax.convert.safetensors_reader import SafetensorsFolder

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]
Rename = Callable[[str], "tuple[Path, Transform] | None"]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_to_kernel(w_OI: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return w_OI.T


def conv_to_kernel(w_OIHW: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return w_OIHW.transpose(2, 3, 1, 0)


# kind of layer -> {torch parameter name: (our parameter name, transform)}
LEAF_RULES: dict[str, dict[str, tuple[str, Transform]]] = {
    "conv": {"weight": ("kernel", conv_to_kernel), "bias": ("bias", identity)},
    "linear": {"weight": ("kernel", linear_to_kernel), "bias": ("bias", identity)},
    "norm": {"weight": ("scale", identity), "bias": ("bias", identity)},
    "embedding": {"weight": ("embedding", identity)},
}


def module_path(parts: Iterable[str]) -> Path:
    """Torch module names -> our scope path, by the project's one naming rule (`convert.names`)."""
    return tuple(diffusers_to_our(".".join(parts)).split("/"))


def table_rename(leaf_kinds: Mapping[str, str]) -> Rename:
    """Rename function from a table `{our last module name: kind}`; keys whose module is not there -> None."""
    for kind in leaf_kinds.values():
        if kind not in LEAF_RULES:
            raise ValueError(f"unknown layer kind {kind!r}")

    def rename(key: str):
        *mods, leaf = key.split(".")
        path = module_path(mods)
        kind = leaf_kinds.get(path[-1]) if path else None
        if kind is None or leaf not in LEAF_RULES[kind]:
            return None
        ours, transform = LEAF_RULES[kind][leaf]
        return path + (ours,), transform

    return rename


def _fmt(items: list, limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def convert_tensors(st: SafetensorsFolder, rename: Rename, abstract_params: Any, *, where: str,
                    prefix: Path = (), buffers: Mapping[str, Callable[[np.ndarray], bool]] | None = None,
                    place: Callable[[Path, np.ndarray], Any] | None = None) -> dict:
    """Every tensor of `st` renamed, transformed, shape-checked and cast to the abstract leaf's dtype.

    `abstract_params` is the model's parameter tree (e.g. `jax.eval_shape(model.init, ...)["params"]`);
    `prefix` is prepended to every renamed path; `buffers` names non-parameter tensors an older checkpoint
    may hold, each skipped only if its check passes. Returns a nested dict of numpy arrays, or of whatever
    `place(path, array)` returns (e.g. `jax.device_put` onto its shards, so the host holds one tensor at a time).
    """
    flat_abstract = {k: v for k, v in traverse_util.flatten_dict(abstract_params).items()}
    filled: dict[Path, np.ndarray] = {}
    source: dict[Path, str] = {}
    unknown, unplaced, bad_shape, tie_mismatch = [], [], [], []
    buffers = buffers or {}
    for key in st.keys():
        if key in buffers:
            if not buffers[key](st.get(key)):
                unknown.append(f"{key} (buffer with unexpected value)")
            continue
        r = rename(key)
        if r is None:
            unknown.append(key)
            continue
        path, transform = r
        path = tuple(prefix) + path
        if path not in flat_abstract:
            unplaced.append(f"{key} -> {'/'.join(path)}")
            continue
        arr = transform(st.get(key))
        want = flat_abstract[path]
        if tuple(arr.shape) != tuple(want.shape):
            bad_shape.append(f"{key}: {tuple(arr.shape)} after transform, our {'/'.join(path)} wants "
                             f"{tuple(want.shape)}")
            continue
        arr = np.asarray(arr, dtype=want.dtype)
        if path in filled:
            if not np.array_equal(np.asarray(filled[path]), arr):
                tie_mismatch.append(f"{key} and {source[path]} (both -> {'/'.join(path)})")
            continue
        filled[path], source[path] = (arr if place is None else place(path, arr)), key
    missing = ["/".join(p) for p in flat_abstract if p not in filled]
    errors = []
    if unknown:
        errors.append(f"unknown keys (no rule maps them): {_fmt(unknown)}")
    if unplaced:
        errors.append(f"keys mapped to no parameter of our model: {_fmt(unplaced)}")
    if bad_shape:
        errors.append(f"shape mismatches: {_fmt(bad_shape)}")
    if tie_mismatch:
        errors.append(f"tied keys with different values: {_fmt(tie_mismatch)}")
    if missing:
        errors.append(f"parameters missing from the checkpoint: {_fmt(missing)}")
    if errors:
        raise ValueError(f"{where}: checkpoint does not match the model:\n  " + "\n  ".join(errors))
    return traverse_util.unflatten_dict(filled)


def read_config(folder: str, *, where: str) -> dict:
    """The `config.json` of a model folder as a dict; a missing folder or file raises naming it."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: model folder {folder} does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: {path} not found")
    with open(path) as f:
        return json.load(f)


def check_fields(cfg: Mapping[str, Any], *, used: Iterable[str], ignored: Iterable[str], where: str) -> None:
    """Raise if `cfg` has a field that is neither used by our model nor known to be irrelevant to it."""
    allowed = set(used) | set(ignored)
    extra = sorted(k for k in cfg if k not in allowed)
    if extra:
        raise ValueError(f"{where}: unsupported config fields {extra}; our port knows {sorted(used)} and "
                         "ignores only metadata and training-only fields")


def require(cond: bool, where: str, msg: str) -> None:
    """Raise ValueError(`where: msg`) unless `cond`: an unsupported config value."""
    if not cond:
        raise ValueError(f"{where}: unsupported config: {msg}")


def abstract_params(model, *args, **kwargs) -> Any:
    """Parameter shapes and dtypes of a Linen model, without allocating: `jax.eval_shape(model.init, ...)`."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
