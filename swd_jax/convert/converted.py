"""A converted checkpoint: a diffusers SD3/SD3.5 or FLUX.1 transformer written once as an orbax checkpoint of our params.

`convert(SRC, DST)` (the command `python -m swd_jax.convert SRC DST`) writes it; `load_converted(DST)` reads it.
SRC is a diffusers transformer folder (config.json + safetensors) or a pipeline folder (then SRC/transformer); its
config's `_class_name` (SD3Transformer2DModel or FluxTransformer2DModel) picks the model.
DST receives `config.json` (our MMDiTConfig or FluxConfig, diffusers field names), `conversion.json` (dtype, source, count)
and `params/` (orbax, via `swd_jax.convert.orbax_params.save_params`). Training reads it with `load_converted(DST)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.orbax_params import load_params, save_params
from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert import flux as flux_convert
from swd_jax.convert.transformer import abstract_params, convert_state_dict, transformer_class, transformer_folder
from swd_jax.models.flux import FluxConfig
from swd_jax.models.mmdit import MMDiTConfig

# diffusers class -> (config class, convert_state_dict, abstract_params)
FAMILIES = {"SD3Transformer2DModel": (MMDiTConfig, convert_state_dict, abstract_params),
            "FluxTransformer2DModel": (FluxConfig, flux_convert.convert_state_dict, flux_convert.abstract_params)}

CONFIG, META, PARAMS = "config.json", "conversion.json", "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class _WithProgress(Mapping):
    """A SafetensorsFolder seen as a Mapping whose reads advance a tqdm bar (one tick per tensor)."""

    def __init__(self, folder: SafetensorsFolder, bar):
        self._folder, self._bar = folder, bar

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._folder.get(key)
        self._bar.update(1)
        self._bar.set_postfix_str(key[-48:], refresh=False)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._folder.keys())

    def __len__(self) -> int:
        return len(self._folder.keys())


def convert(src: str, dst: str, dtype: str = "float32", overwrite: bool = False,
            progress: bool = True) -> MMDiTConfig | FluxConfig:
    """SRC diffusers transformer (or pipeline) folder -> DST: config.json, conversion.json, params/ (orbax)."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    folder = transformer_folder(src)
    if os.path.exists(os.path.join(dst, PARAMS)) and not overwrite:
        raise FileExistsError(f"{dst} already holds converted params; pass --overwrite to replace them")
    name = transformer_class(folder)
    config_cls, convert_fn, _ = FAMILIES[name]
    cfg = config_cls.from_folder(folder)
    tensors = SafetensorsFolder(folder)
    with tqdm(total=len(tensors.keys()), desc="tensors", unit="t", disable=not progress) as bar:
        params = convert_fn(_WithProgress(tensors, bar), cfg, DTYPES[dtype])
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if not bool(jnp.all(jnp.isfinite(x)))]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} weights hold NaN or infinite values, e.g. {bad[:3]}; not converted")
    os.makedirs(dst, exist_ok=True)
    save_params(os.path.join(dst, PARAMS), params, overwrite=overwrite)
    with open(os.path.join(dst, CONFIG), "w") as f:
        json.dump(dict(_class_name=name, **dataclasses.asdict(cfg)), f, indent=2)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    with open(os.path.join(dst, META), "w") as f:
        json.dump({"dtype": dtype, "source": os.path.abspath(folder), "num_params": n}, f, indent=2)
    return cfg


def model_kind(path: str) -> str:
    """'converted' (written by `convert`), 'pipeline' (diffusers pipeline folder) or 'transformer' (its
    transformer folder); a one-line error saying what the folder is when it is none of them."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path {path!r} is not a folder")
    if os.path.exists(os.path.join(path, META)) and os.path.isdir(os.path.join(path, PARAMS)):
        return "converted"
    if os.path.exists(os.path.join(path, "model_index.json")) or \
            os.path.exists(os.path.join(path, "transformer", CONFIG)):
        return "pipeline"
    if os.path.exists(os.path.join(path, CONFIG)) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        return "transformer"
    raise FileNotFoundError(f"{path} is neither a converted checkpoint (conversion.json + params/, from "
                            "`swd-convert`), a diffusers pipeline folder (model_index.json or transformer/) nor a "
                            "diffusers transformer folder (config.json + *.safetensors)")


def load_converted(dst: str, shardings=None) -> tuple[MMDiTConfig | FluxConfig, dict]:
    """DST written by `convert` -> (config, params), strictly checked against our abstract params.

    `shardings`, if given, is a pytree like the params of `jax.sharding.Sharding`s; otherwise every leaf is
    restored replicated over all devices (`swd_jax.convert.orbax_params.load_params`).
    """
    for name in (CONFIG, META, PARAMS):
        if not os.path.exists(os.path.join(dst, name)):
            raise FileNotFoundError(f"{dst} has no {name}; write it with `python -m swd_jax.convert SRC {dst}`")
    config_cls, _, abstract_fn = FAMILIES[transformer_class(dst)]
    cfg = config_cls.from_folder(dst)
    with open(os.path.join(dst, META)) as f:
        dtype = json.load(f)["dtype"]
    abstract = abstract_fn(cfg, DTYPES[dtype])
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return cfg, load_params(os.path.join(dst, PARAMS), abstract)
