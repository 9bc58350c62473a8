"""A converted checkpoint: a diffusers SD3/SD3.5 or FLUX.1 transformer written once as an orbax checkpoint of our params.

`convert(SRC, DST)` (the command `swd-convert SRC DST`) writes it; `load_converted(DST)` reads it. SRC and DST may
be local or `gs://` (a pipeline folder on Cloud Storage: only its transformer/ is downloaded; DST's params are
written and read by orbax directly, its JSON files through `swd_jax.storage`).
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

from swd_jax import storage
from swd_jax.convert import flux as flux_convert
from swd_jax.convert.folders import local_model_folder, read_json, source_path
from swd_jax.convert.orbax_params import load_params, save_params
from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.transformer import convert_state_dict, transformer_class, transformer_folder
from swd_jax.models.backbone import DIFFUSERS_CLASSES, backbone_of, backbone_of_class
from swd_jax.models.flux import FluxConfig
from swd_jax.models.mmdit import MMDiTConfig

# The converter of each family of `models.backbone.BACKBONES` (by kind): diffusers tensors -> our params.
CONVERTERS = {"mmdit": convert_state_dict, "flux": flux_convert.convert_state_dict}

CONFIG, META, PARAMS = "config.json", "conversion.json", "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_diffusers(folder: str, dtype=jnp.float32, shardings: dict | None = None):
    """A diffusers transformer folder (config.json + safetensors) of either family -> (config, params): the
    folder's `_class_name` picks the converter; `shardings` as in `convert_state_dict`."""
    cfg = diffusers_config(folder)
    return cfg, CONVERTERS[backbone_of(cfg).kind](SafetensorsFolder(folder), cfg, dtype, shardings)


def diffusers_config(folder: str) -> MMDiTConfig | FluxConfig:
    """The config of a diffusers transformer folder, its family by the folder's `_class_name`."""
    return backbone_of_class(transformer_class(folder)).config_cls.from_folder(folder)


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
    dst = storage.resolve(dst)
    src = storage.resolve(src) if storage.is_remote(src) else src  # local: as typed (it may be a Hub id)
    if storage.isfile(dst):
        raise NotADirectoryError(f"{dst} is a file, not a folder")
    existing = storage.listdir(dst)
    if existing and not overwrite:
        if PARAMS in existing:
            raise FileExistsError(f"{dst} already holds converted params; pass --overwrite to replace them")
        held = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise FileExistsError(f"{dst} is not empty (holds {held}); give a new or empty folder, or --overwrite to "
                              "write there anyway")
    if storage.is_remote(src) and not storage.exists(src):
        raise FileNotFoundError(f"{src} does not exist")
    local = local_model_folder(src, parts=("transformer",), what="SRC")  # local, a gs:// copy or a Hub snapshot
    folder = transformer_folder(local)
    cfg = diffusers_config(folder)
    family = backbone_of(cfg)
    name, convert_fn = family.diffusers_class, CONVERTERS[family.kind]
    tensors = SafetensorsFolder(folder)
    with tqdm(total=len(tensors.keys()), desc="tensors", unit="t", disable=not progress) as bar:
        params = convert_fn(_WithProgress(tensors, bar), cfg, DTYPES[dtype])
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if not bool(jnp.all(jnp.isfinite(x)))]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} weights hold NaN or infinite values, e.g. {bad[:3]}; not converted")
    storage.makedirs(dst)
    save_params(storage.join(dst, PARAMS), params, overwrite=overwrite)
    storage.write_text(storage.join(dst, CONFIG), json.dumps(dict(_class_name=name, **dataclasses.asdict(cfg)),
                                                             indent=2))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    source = source_path(src, local, folder) if storage.is_remote(src) else os.path.abspath(folder)
    # written last: model_kind() calls DST a converted checkpoint once conversion.json and params/ are there
    storage.write_text(storage.join(dst, META), json.dumps({"dtype": dtype, "source": source, "num_params": n},
                                                           indent=2))
    return cfg


def model_kind(path: str) -> str:
    """'converted' (written by `convert`), 'pipeline' (diffusers pipeline folder) or 'transformer' (its
    transformer folder); a one-line error saying what the folder is when it is none of them."""
    path = storage.resolve(path)
    names = storage.listdir(path)
    if not names:
        raise FileNotFoundError(f"model.path {path!r} is not a folder")
    if META in names and storage.isdir(storage.join(path, PARAMS)):
        return "converted"
    if "model_index.json" in names or storage.exists(storage.join(path, "transformer", CONFIG)):
        return "pipeline"
    if CONFIG in names and any(f.endswith(".safetensors") for f in names):
        return "transformer"
    raise FileNotFoundError(f"{path} is neither a converted checkpoint (conversion.json + params/, from "
                            "`swd-convert`), a diffusers pipeline folder (model_index.json or transformer/) nor a "
                            "diffusers transformer folder (config.json + *.safetensors)")


def load_converted(dst: str, shardings=None) -> tuple[MMDiTConfig | FluxConfig, dict]:
    """DST written by `convert` -> (config, params), strictly checked against our abstract params.

    `shardings`, if given, is a pytree like the params of `jax.sharding.Sharding`s; otherwise every leaf is
    restored replicated over all devices (`swd_jax.convert.orbax_params.load_params`).
    """
    dst = storage.resolve(dst)
    names = storage.listdir(dst)
    for name in (CONFIG, META, PARAMS):
        if name not in names:
            raise FileNotFoundError(f"{dst} has no {name}; write it with `swd-convert SRC {dst}`")
    cfg = read_config(dst)
    dtype = read_json(storage.join(dst, META), "conversion record").get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{storage.join(dst, META)}: dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    abstract = backbone_of(cfg).abstract_params(cfg, DTYPES[dtype])
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return cfg, load_params(storage.join(dst, PARAMS), abstract)


def read_config(folder: str) -> MMDiTConfig | FluxConfig:
    """The transformer config in `folder`/config.json (local or gs://), its class by `_class_name`."""
    d = read_json(storage.join(folder, CONFIG), "transformer config")
    name = d.get("_class_name", "SD3Transformer2DModel") if isinstance(d, dict) else None
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"{storage.join(folder, CONFIG)}: transformer class {name!r} is not supported; expected "
                         f"one of {DIFFUSERS_CLASSES}")
    return backbone_of_class(name).config_cls.from_dict(d)


def conversion_source(dst: str) -> str:
    """The diffusers transformer folder a converted checkpoint was made from (its conversion.json's "source")."""
    return read_json(storage.join(storage.resolve(dst), META), "conversion record").get("source") or ""
