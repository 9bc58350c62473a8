"""Our LoRA collection <-> PEFT adapter folders (and diffusers `load_lora_weights` files), strictly checked.

Our LoRA pytree mirrors the params tree: each adapted Dense holds `lora_A` [in, r] and `lora_B` [r, out] with
y = x W + b + (alpha / r) x A B. PEFT stores the same factors transposed as torch Linear weights:
`base_model.model.<diffusers module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], beside an
`adapter_config.json` (r, lora_alpha, target_modules). The published SwD adapters (yandex-research/swd) are such
PEFT folders, loaded with `PeftModel.from_pretrained(pipe.transformer, path)`. diffusers' `save_lora_weights`
files (`pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight`, the config, if any, in the
safetensors metadata) are read too. Anything we cannot reproduce exactly (DoRA, rsLoRA, per-module ranks, LoRA
on a layer our MMDiT does not adapt, extra or missing tensors) raises with the offending names.
The model class follows the config: an `MMDiTConfig` (SD3/SD3.5, LoRA on the blocks' attention and MLP
Linears) or a `FluxConfig` (FLUX.1, LoRA on any Linear, as PEFT's `target_modules` name them).
"""
from __future__ import annotations

import functools
import json
import os
import re
import zlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFile
from swd_jax.models import flux
from swd_jax.models.layers import LORA, LoraConfig
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from swd_jax.models.mmdit import example_inputs
from swd_jax.models.names import diffusers_to_our, our_to_diffusers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
TransformerConfig = MMDiTConfig | flux.FluxConfig
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# adapter_config.json fields we read, or that cannot change the adapted forward pass; every other field must be
# unset (None, False, empty, "none") or the adapter is refused.
_HARMLESS_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode",
    "init_lora_weights", "lora_dropout", "peft_version", "r", "lora_alpha", "target_modules", "megatron_core",
    "qalora_group_size", "bias",
}
_NAMED_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=true) is not supported",
    "use_rslora": "rsLoRA (use_rslora=true, scale alpha/sqrt(r)) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported: one rank for all modules",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported: one alpha for all modules",
    "lora_bias": "LoRA biases (lora_bias=true) are not supported",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D layers) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
}


# ----------------------------------------------------------------------------------------------------------------
# our side: init, shapes, which modules are adapted
# ----------------------------------------------------------------------------------------------------------------
def _model_and_inputs(cfg: TransformerConfig, lora: LoraConfig | None):
    """Our module for `cfg` (MMDiT or Flux, by the config's class) and zero inputs to trace it with."""
    if isinstance(cfg, flux.FluxConfig):
        return flux.Flux(cfg, lora=lora), flux.example_inputs(cfg, 1)
    if isinstance(cfg, MMDiTConfig):
        return MMDiT(cfg, lora=lora), example_inputs(cfg, 1)
    raise TypeError(f"expected an MMDiTConfig or FluxConfig, got {type(cfg).__name__}")


def diffusers_class(cfg: TransformerConfig) -> str:
    """The diffusers class name of the transformer `cfg` describes."""
    return "FluxTransformer2DModel" if isinstance(cfg, flux.FluxConfig) else "SD3Transformer2DModel"


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg: TransformerConfig, lora: LoraConfig | None) -> dict:
    """Shapes of Model(cfg, lora).init: {"params": ..., "lora": ...} (one trace per config, cached, read-only)."""
    model, inputs = _model_and_inputs(cfg, lora)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    return {"params": nn.unbox(variables["params"]), LORA: nn.unbox(variables.get(LORA, {}))}


def abstract_lora(cfg: TransformerConfig, lora: LoraConfig, param_dtype=jnp.float32) -> dict:
    """Shapes/dtypes (jax.ShapeDtypeStruct) of the LoRA collection for `cfg` and `lora`; no memory allocated."""
    check_targets(cfg, lora)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), _abstract_variables(cfg, lora)[LORA])


@functools.partial(jax.jit, static_argnames=("shape", "rank", "dtype"))
def _draw_a(key, module_id, shape: tuple[int, ...], rank: int, dtype):
    """A ~ N(0, (1/r)^2) from fold_in(key, module_id); compiled once per shape, not once per module."""
    return (jax.random.normal(jax.random.fold_in(key, module_id), shape, jnp.float32) / rank).astype(dtype)


def init_lora(cfg: TransformerConfig, lora: LoraConfig, key: jax.Array, param_dtype=jnp.float32,
              shardings: Any = None) -> dict:
    """A fresh LoRA collection: A ~ N(0, (1/r)^2), B = 0 (PEFT "gaussian"), so the student starts as the teacher.

    Same shapes and distribution as `MMDiT(cfg, lora=lora).init(key, ...)["lora"]` (LoraDense's initializer), but
    the model is only traced (eval_shape), never compiled, and each A is drawn by one small jitted function per
    shape from `fold_in(key, crc32(its path))`, so values do not depend on which other modules are adapted
    (one jit over all modules took about a minute to compile on CPU for SD3.5-M: XLA copies threefry into
    every output).
    `shardings` (a pytree like the result, or one sharding) places the factors.
    """
    flat = flax.traverse_util.flatten_dict(abstract_lora(cfg, lora, param_dtype))
    out = {}
    for path, x in flat.items():
        if path[-1] == "lora_B":
            out[path] = jnp.zeros(x.shape, x.dtype)
        else:
            module_id = np.uint32(zlib.crc32("/".join(path).encode()))
            out[path] = _draw_a(key, module_id, shape=tuple(x.shape), rank=lora.rank, dtype=np.dtype(x.dtype))
    lora_params = flax.traverse_util.unflatten_dict(out)
    return lora_params if shardings is None else jax.device_put(lora_params, shardings)


def _linear_modules(cfg: TransformerConfig, lora: LoraConfig | None = None) -> dict[str, tuple[int, int]]:
    """diffusers module path -> (in, out) of every Dense-like layer of the MMDiT (2-D kernels; any `lora`)."""
    flat = flax.traverse_util.flatten_dict(_abstract_variables(cfg, lora)["params"])
    return {our_to_diffusers("/".join(p[:-1])): tuple(v.shape) for p, v in flat.items()
            if p[-1] == "kernel" and len(v.shape) == 2}


def lora_modules(cfg: TransformerConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """diffusers module path -> (in, out) of every layer that carries LoRA factors for this config."""
    flat = flax.traverse_util.flatten_dict(_abstract_variables(cfg, lora)[LORA])
    return {our_to_diffusers("/".join(p[:-1])): (v.shape[0], flat[p[:-1] + ("lora_B",)].shape[1])
            for p, v in flat.items() if p[-1] == "lora_A"}


def check_targets(cfg: TransformerConfig, lora: LoraConfig) -> None:
    """Raise if `lora.targets` match no layer, or a layer PEFT would adapt but our MMDiT does not."""
    matched = {m for m in _linear_modules(cfg, lora) if lora.matches(m)}
    adapted = set(lora_modules(cfg, lora))
    unsupported = sorted(matched - adapted)
    if unsupported:
        raise ValueError(f"LoRA targets {list(lora.targets)} match layers our MMDiT does not adapt (only the "
                         f"attention and feed-forward Linears of the blocks are): {unsupported}")
    if not adapted:
        raise ValueError(f"LoRA targets {list(lora.targets)} match no layer of this model")


# ----------------------------------------------------------------------------------------------------------------
# export: ours -> PEFT folder
# ----------------------------------------------------------------------------------------------------------------
def _factors_by_module(lora_params: dict) -> dict[str, dict[str, Any]]:
    """Our LoRA pytree -> {diffusers module path: {"A": [in, r], "B": [r, out]}}."""
    out: dict[str, dict[str, Any]] = {}
    for path, value in flax.traverse_util.flatten_dict(nn.unbox(lora_params)).items():
        if path[-1] not in ("lora_A", "lora_B"):
            raise ValueError(f"not a LoRA factor: {'/'.join(path)} (expected leaves lora_A / lora_B)")
        out.setdefault(our_to_diffusers("/".join(path[:-1])), {})[path[-1][-1]] = value
    return out


def peft_config_dict(lora: LoraConfig, base_model_name_or_path: str | None = None,
                     base_model_class: str = "SD3Transformer2DModel") -> dict[str, Any]:
    """The adapter_config.json PEFT needs for our LoRA (plain LoRA: no DoRA, no rsLoRA, one rank)."""
    alpha = float(lora.alpha)
    return {
        "peft_type": "LORA", "task_type": None, "r": int(lora.rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": sorted(lora.targets), "init_lora_weights": "gaussian", "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
        "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": {"base_model_class": base_model_class,
                         "parent_library": _PARENT_LIBRARY[base_model_class]},
    }


_PARENT_LIBRARY = {"SD3Transformer2DModel": "diffusers.models.transformers.transformer_sd3",
                   "FluxTransformer2DModel": "diffusers.models.transformers.transformer_flux"}


def _export_tensors(lora_params: dict, lora: LoraConfig, prefix: str, cfg: TransformerConfig | None,
                    dtype) -> dict[str, np.ndarray]:
    """Our LoRA pytree -> {prefix + module + ".lora_A/B.weight": torch-layout numpy array}, strictly checked."""
    factors = _factors_by_module(lora_params)
    problems = []
    for module, f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            problems.append(f"{module}: has only lora_{''.join(sorted(f))}")
        elif not lora.matches(module):
            problems.append(f"{module}: not matched by targets {list(lora.targets)}")
        elif f["A"].shape[1] != lora.rank or f["B"].shape[0] != lora.rank:
            problems.append(f"{module}: factors {tuple(f['A'].shape)} x {tuple(f['B'].shape)} are not rank "
                            f"{lora.rank}")
    if cfg is not None:
        want = lora_modules(cfg, lora)
        problems += [f"{m}: missing" for m in sorted(set(want) - set(factors))]
        problems += [f"{m}: not a LoRA layer of this model" for m in sorted(set(factors) - set(want))]
    if problems:
        raise ValueError("cannot export the LoRA pytree:\n  " + "\n  ".join(problems))

    def cast(x):
        x = np.asarray(jax.device_get(x))
        return np.ascontiguousarray((x if dtype is None else x.astype(dtype)).T)

    tensors = {}
    for module, f in factors.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = cast(f["A"])  # [r, in]
        tensors[f"{prefix}{module}.lora_B.weight"] = cast(f["B"])  # [out, r]
    return tensors


def export_peft(lora_params: dict, lora: LoraConfig, folder: str, *, cfg: TransformerConfig | None = None,
                dtype=None, base_model_name_or_path: str | None = None, overwrite: bool = False) -> None:
    """Write our LoRA pytree as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    `cfg`, if given, also checks that exactly the modules of `lora_modules(cfg, lora)` are present. `dtype` casts
    the stored factors (default: as they are). No torch: safetensors' numpy API.
    """
    from safetensors.numpy import save_file

    tensors = _export_tensors(lora_params, lora, PEFT_PREFIX, cfg, dtype)
    paths = [os.path.join(folder, n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
    if not overwrite and any(os.path.exists(p) for p in paths):
        raise FileExistsError(f"{folder} already holds an adapter; pass overwrite=True to replace it")
    base_class = diffusers_class(cfg) if cfg is not None else "SD3Transformer2DModel"
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, paths[1], metadata={"format": "pt"})
    with open(paths[0], "w") as fh:
        json.dump(peft_config_dict(lora, base_model_name_or_path, base_class), fh, indent=2, sort_keys=True)


def export_diffusers_lora(lora_params: dict, lora: LoraConfig, folder: str, *, cfg: TransformerConfig | None = None,
                          dtype=None, overwrite: bool = False) -> str:
    """Write our LoRA pytree as `folder/pytorch_lora_weights.safetensors`, the file `pipe.load_lora_weights(folder)`
    reads: keys `transformer.<module>.lora_A.weight`, the PEFT config (rank, alpha, targets) in the header as
    diffusers' `save_lora_weights` stores it. Returns the file's path. Checks as `export_peft`.
    """
    from safetensors.numpy import save_file

    tensors = _export_tensors(lora_params, lora, DIFFUSERS_PREFIX, cfg, dtype)
    path = os.path.join(folder, DIFFUSERS_WEIGHTS)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    config = {k: v for k, v in peft_config_dict(lora).items() if k not in ("auto_mapping", "base_model_name_or_path")}
    meta = json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt", DIFFUSERS_METADATA_KEY: meta})
    return path


# ----------------------------------------------------------------------------------------------------------------
# import: PEFT folder / diffusers LoRA file -> ours
# ----------------------------------------------------------------------------------------------------------------
def adapter_files(path: str) -> tuple[str, str, dict[str, Any] | None]:
    """Locate an adapter: -> (format "peft"|"diffusers", safetensors file, config dict or None)."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: only .safetensors LoRA files are supported")
        return "diffusers", path, _diffusers_metadata(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no LoRA adapter at {path}")
    config = os.path.join(path, ADAPTER_CONFIG)
    if os.path.exists(config):
        weights = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} "
                                    f"(found: {sorted(os.listdir(path))}); only safetensors adapters are supported")
        with open(config) as fh:
            try:
                return "peft", weights, json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    weights = os.path.join(path, DIFFUSERS_WEIGHTS)
    if os.path.exists(weights):
        return "diffusers", weights, _diffusers_metadata(weights)
    raise FileNotFoundError(f"{path}: neither a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor a diffusers "
                            f"LoRA ({DIFFUSERS_WEIGHTS}); found {sorted(os.listdir(path))}")


def _diffusers_metadata(weights: str) -> dict[str, Any] | None:
    """The transformer's LoraConfig that diffusers stores (keys `transformer.<field>`) in the safetensors header."""
    raw = SafetensorsFile(weights).metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    meta = json.loads(raw)
    cfg = {k[len(DIFFUSERS_PREFIX):]: v for k, v in meta.items() if k.startswith(DIFFUSERS_PREFIX)}
    return cfg or None


def _lora_config(cfg_dict: dict[str, Any], cfg: TransformerConfig, source: str) -> LoraConfig:
    """PEFT LoraConfig fields -> our LoraConfig; anything that changes the math and we do not do raises."""
    bad = []
    for field, value in sorted(cfg_dict.items()):
        if field in _HARMLESS_FIELDS or value in (None, False, {}, [], "", "none", 0):
            continue
        bad.append(_NAMED_UNSUPPORTED.get(field, f"unsupported adapter config field {field}={value!r}"))
    if cfg_dict.get("peft_type", "LORA") != "LORA":
        bad.append(f"peft_type={cfg_dict['peft_type']!r} is not LORA")
    if cfg_dict.get("bias", "none") != "none":
        bad.append(f"bias={cfg_dict['bias']!r} (trained base biases) is not supported")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if cfg_dict.get(k) is None]
    if missing:
        bad.append(f"missing fields {missing}")
    if bad:
        raise ValueError(f"{source}: unsupported LoRA adapter config:\n  " + "\n  ".join(bad))
    targets = cfg_dict["target_modules"]
    if isinstance(targets, str):  # PEFT: a regex matched against the full module name
        if targets == "all-linear":
            raise ValueError(f"{source}: target_modules='all-linear' adapts layers our MMDiT does not adapt")
        targets = sorted(m for m in _linear_modules(cfg) if re.fullmatch(targets, m))
    return LoraConfig(rank=int(cfg_dict["r"]), alpha=float(cfg_dict["lora_alpha"]), targets=tuple(sorted(targets)))


def import_lora(path: str, cfg: TransformerConfig, dtype=jnp.float32) -> tuple[LoraConfig, dict]:
    """A PEFT adapter folder or diffusers LoRA file -> (our LoraConfig, our LoRA pytree), strictly checked.

    Tensors are read one at a time from the memory-mapped safetensors file. A diffusers file without stored
    config gets rank from the shapes and alpha = rank (scale 1, diffusers' convention), targets = its modules.
    """
    fmt, weights, cfg_dict = adapter_files(path)
    prefix = PEFT_PREFIX if fmt == "peft" else DIFFUSERS_PREFIX
    st = SafetensorsFile(weights)
    shapes, unknown = {}, []
    for key in st.keys():
        m = _FACTOR_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if m is None:
            unknown.append(key)
        else:
            shapes.setdefault(m["module"], {})[m["factor"]] = (key, st.shape(key))
    if unknown:
        raise ValueError(f"{weights}: keys that are not `{prefix}<module>.lora_A/B.weight` of the transformer: "
                         f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}")
    if not shapes:
        raise ValueError(f"{weights}: holds no LoRA factors")
    if cfg_dict is None:  # bare diffusers file: rank from the shapes, alpha = rank, targets = the modules present
        ranks = {f["A"][1][0] for f in shapes.values() if "A" in f}
        if len(ranks) != 1:
            raise ValueError(f"{weights}: different ranks per module {sorted(ranks)} are not supported")
        cfg_dict = {"r": ranks.pop(), "target_modules": sorted(shapes)}
        cfg_dict["lora_alpha"] = cfg_dict["r"]
    lora = _lora_config(cfg_dict, cfg, weights)
    check_targets(cfg, lora)
    want = lora_modules(cfg, lora)
    r, problems = lora.rank, []
    problems += [f"{m}: not a LoRA layer of this model with targets {list(lora.targets)}"
                 for m in sorted(set(shapes) - set(want))]
    problems += [f"{m}: missing (lora_A and lora_B)" for m in sorted(set(want) - set(shapes))]
    out = {}
    for module in sorted(set(want) & set(shapes)):
        f, (n_in, n_out) = shapes[module], want[module]
        if set(f) != {"A", "B"}:
            problems.append(f"{module}: missing lora_{({'A', 'B'} - set(f)).pop()}")
            continue
        if f["A"][1] != (r, n_in) or f["B"][1] != (n_out, r):
            problems.append(f"{module}: lora_A {f['A'][1]}, lora_B {f['B'][1]}; expected ({r}, {n_in}) and "
                            f"({n_out}, {r}) for rank {r}")
            continue
        scope = tuple(diffusers_to_our(module).split("/"))
        out[scope + ("lora_A",)] = jnp.asarray(np.asarray(st.get(f["A"][0]), dtype).T)
        out[scope + ("lora_B",)] = jnp.asarray(np.asarray(st.get(f["B"][0]), dtype).T)
    if problems:
        raise ValueError(f"{weights}: LoRA adapter does not match the transformer config:\n  " + "\n  ".join(problems))
    return lora, flax.traverse_util.unflatten_dict(out)
