"""The transformer families the SwD trainer distils (SD3/SD3.5 MMDiT, FLUX.1), behind one small record.

A `Backbone` says how to build and initialise one family (loading its diffusers weights is
`swd_jax.convert.converted.load_diffusers`); the train step calls every family the same way
(`SwDModels.velocity`), the only difference being FLUX-dev's guidance embedding, an extra input of every pass.
`model.kind` names the family of a random model; for loaded weights the folder's `_class_name` decides, and a
`model.kind` that disagrees raises.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from swd_jax.models.flux import Flux, FluxConfig
from swd_jax.models.flux import example_inputs as flux_example_inputs
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from swd_jax.models.mmdit import example_inputs as mmdit_example_inputs


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One transformer family: its config and module classes, init inputs, abstract params (its diffusers loader:
    `swd_jax.convert.converted.load_diffusers`)."""
    kind: str
    diffusers_class: str
    config_cls: type
    module_cls: type
    example_inputs: Callable[..., tuple]  # (cfg, batch) -> positional init inputs
    sample_preset: str  # swd_jax.method.schedule preset the published SwD student of this family samples with
    max_sequence_length: int  # T5 tokens the published student samples with

    def boxed_params(self, cfg, param_dtype=jnp.float32) -> dict:
        """Shapes/dtypes of the family's params (no memory allocated), boxed with their logical axis names."""
        model = self.module_cls(cfg, param_dtype=param_dtype)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), *self.example_inputs(cfg, 1))["params"])

    def abstract_params(self, cfg, param_dtype=jnp.float32) -> dict:
        """Shapes/dtypes of the family's params (no memory allocated): what a converter fills."""
        return nn.unbox(self.boxed_params(cfg, param_dtype))

    def latent_multiple(self, cfg) -> int:
        """What every latent size must be a multiple of: MMDiT's patch; FLUX's 2x2 packing."""
        return 2 if isinstance(cfg, FluxConfig) else cfg.patch_size

    def num_blocks(self, cfg) -> int:
        """Blocks a feature index may name: MMDiT's joint blocks; FLUX's double then single blocks."""
        return cfg.num_blocks if isinstance(cfg, FluxConfig) else cfg.num_layers


BACKBONES = {
    "mmdit": Backbone("mmdit", "SD3Transformer2DModel", MMDiTConfig, MMDiT, mmdit_example_inputs, "sd35_medium_6", 256),
    "flux": Backbone("flux", "FluxTransformer2DModel", FluxConfig, Flux, flux_example_inputs, "flux_4", 512),
}

DIFFUSERS_CLASSES = tuple(b.diffusers_class for b in BACKBONES.values())


def backbone_of(cfg: Any) -> Backbone:
    """The family of a model config (MMDiTConfig or FluxConfig)."""
    for b in BACKBONES.values():
        if isinstance(cfg, b.config_cls):
            return b
    raise TypeError(f"no backbone for config {type(cfg).__name__}")


def backbone_of_class(diffusers_class: str) -> Backbone:
    """The family of a diffusers transformer `_class_name` (SD3Transformer2DModel, FluxTransformer2DModel)."""
    for b in BACKBONES.values():
        if b.diffusers_class == diffusers_class:
            return b
    raise ValueError(f"transformer class {diffusers_class!r} is not supported; expected one of "
                     f"{DIFFUSERS_CLASSES}")


def backbone_kind(kind: str) -> Backbone:
    if kind not in BACKBONES:
        raise ValueError(f"model.kind={kind!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[kind]


def random_config(kind: str, fields: dict):
    """`model.random` (the config fields of a random-weight model of family `kind`) -> its config."""
    b = backbone_kind(kind)
    names = {f.name for f in dataclasses.fields(b.config_cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"model.random has fields {unknown} that {b.config_cls.__name__} (model.kind={kind!r}) "
                         f"lacks; it takes {sorted(names)}")
    return b.config_cls(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()})


def check_kind(kind: str, cfg: Any, path: str) -> Backbone:
    """The family of loaded weights; raises if `model.kind` names another."""
    b = backbone_of(cfg)
    if kind != b.kind:
        raise ValueError(f"model.kind={kind!r} but {path} holds a {b.diffusers_class}: set model.kind={b.kind!r}"
                         + (" (configs/flux_dev.py)" if b.kind == "flux" else ""))
    return b


def model_guidance(cfg: Any, model_guidance_value: float | None, cfg_teacher: float,
                   guidance_teacher: float) -> float | None:
    """The guidance-embedding input of the student and fake passes: `model.guidance` for FLUX-dev, else None.

    FLUX-dev is guidance-distilled: its teacher takes the scale through the embedding (`loss.guidance_teacher`),
    so a classifier-free-guidance teacher (`loss.cfg_teacher` > 1, a doubled batch) is refused.
    """
    if not getattr(cfg, "guidance_embeds", False):
        return None
    if model_guidance_value is None or not model_guidance_value > 0:
        raise ValueError(f"model.guidance={model_guidance_value!r}: this FLUX model has a guidance embedding "
                         "(FLUX-dev); give the student's guidance scale, e.g. 4.5 as the published FLUX-SwD")
    if cfg_teacher != 1.0:
        raise ValueError(f"loss.cfg_teacher={cfg_teacher}: FLUX-dev is guidance-distilled, its teacher takes "
                         "loss.guidance_teacher through the guidance embedding; set loss.cfg_teacher=1.0")
    if not guidance_teacher > 0:
        raise ValueError(f"loss.guidance_teacher={guidance_teacher!r}: the FLUX-dev teacher's embedded guidance "
                         "scale must be positive (4.5 as the published FLUX-SwD samples)")
    return float(model_guidance_value)
