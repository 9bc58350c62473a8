"""Everything a run needs before its loop: config checks, base weights, models, optimisers, sharded state, data."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from swd_jax.convert.converted import diffusers_config, load_diffusers
from swd_jax.convert.converted import model_kind, read_config
from swd_jax.convert.folders import from_hub, local_transformer_folder
from swd_jax.method.discriminator import DiscriminatorHead
from swd_jax.method.schedule import PRESETS, ScaleSchedule, make_schedule
from swd_jax.models.backbone import backbone_kind, backbone_of, check_kind, model_guidance, random_config
from swd_jax.models.block_scan import BlockGroup, stack_blocks, unstack_blocks
from swd_jax.models.flux import FluxConfig
from swd_jax.models.layers import (ATTENTION_IMPLS, LORA, REMAT_POLICIES, LoraConfig, check_blocks_without_remat,
                                   check_remat)
from swd_jax.models.mmdit import MMDiTConfig
from swd_jax.train import sharding
from swd_jax.train.steps import LossConfig, SwDModels, init_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, field: str):
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def make_optimizer(lr: float, o) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (METHOD.md s.5)."""
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def loss_config(c) -> LossConfig:
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    d = c.loss.to_dict()
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown loss config fields: {unknown}")
    for k in ("cls_blocks", "mmd_blocks", "dmd_range", "pdm_range"):
        d[k] = tuple(d[k])
    if d.get("do_gan", True) and not d.get("do_dmd", True):
        raise ValueError("loss.do_gan=True needs loss.do_dmd=True: the discriminator head trains in the fake "
                         "updates, which run only with DMD on (as in the official train.py); set loss.do_gan=False")
    return LossConfig(**d)


def load_base(c, mesh) -> tuple[MMDiTConfig | FluxConfig, dict]:
    """The frozen base transformer weights, sharded on `mesh` by their logical axes (FSDP by default)."""
    m = c.model
    pdt = _dtype(m.param_dtype, "model.param_dtype")
    kind = m.get("kind", "mmdit")
    path = from_hub(m.path, ("transformer",), "model.path")  # a Hub id: its snapshot in the Hub's cache
    source = model_source(m.source, path)
    if source == "random":
        cfg = random_config(kind, m.random.to_dict())
    else:
        cfg = _read_model_config(source, path)
    bb = backbone_kind(kind) if source == "random" else check_kind(kind, cfg, m.path)
    shardings = sharding.boxed_shardings(bb.boxed_params(cfg, pdt), mesh, c.mesh.rules)
    if source == "random":
        model = bb.module_cls(cfg, param_dtype=pdt)
        init = lambda: nn.unbox(model.init(jax.random.key(c.train.seed), *bb.example_inputs(cfg, 1))["params"])
        return cfg, jax.jit(init, out_shardings=shardings)()
    if source == "diffusers":
        return load_diffusers(local_transformer_folder(path), dtype=pdt, shardings=shardings)
    from swd_jax.convert.converted import load_converted
    cfg, params = load_converted(path, shardings=shardings)
    wrong = {str(x.dtype) for x in jax.tree.leaves(params)} - {jnp.dtype(pdt).name}
    if wrong:
        raise ValueError(f"{m.path} holds {sorted(wrong)} weights but model.param_dtype={m.param_dtype!r}; "
                         f"convert with --dtype {m.param_dtype} or change model.param_dtype")
    return cfg, params


def model_source(source: str, path: str) -> str:
    """'random', 'diffusers' or 'converted': model.source, with 'auto' recognising what model.path holds."""
    if source not in ("auto", "random", "diffusers", "converted"):
        raise ValueError(f"model.source={source!r}; expected 'auto', 'random', 'diffusers' or 'converted'")
    if source == "random":
        return source
    if not path:
        raise ValueError(f"model.source={source!r} needs model.path (a converted checkpoint, or a diffusers "
                         "pipeline or transformer folder)")
    kind = model_kind(path)
    found = "converted" if kind == "converted" else "diffusers"
    if source != "auto" and source != found:
        raise ValueError(f"model.path {path} is a {'converted checkpoint' if kind == 'converted' else 'diffusers ' + kind + ' folder'}"
                         f", but model.source={source!r}: set --config.model.source=auto (or {found!r})")
    return found


def default_feature_block(num_layers: int) -> int:
    """The reference's feature block for its depths (11 of 24 for Medium, 20 of 38 for Large), else 11/24 of the depth."""
    return {24: 11, 38: 20}.get(num_layers, min(num_layers - 1, max(0, round(num_layers * 11 / 24))))


def _read_model_config(source: str, path: str) -> MMDiTConfig | FluxConfig:
    """The config of a diffusers transformer (or pipeline) folder or a converted checkpoint, by its _class_name."""
    if source == "converted":
        return read_config(path)  # local or gs://
    path = local_transformer_folder(path)  # gs://: a local copy of transformer/
    return diffusers_config(path)


def check_schedule_fits(schedule: ScaleSchedule | Sequence[int], cfg: MMDiTConfig) -> None:
    """Every scale a multiple of the patch and within the position grid; else name what fits."""
    scales = tuple(getattr(schedule, "scales", schedule))
    bad = [s for s in scales if s > cfg.max_latent_size or s % cfg.patch_size]
    if not bad:
        return
    fitting = [name for name, p in PRESETS.items()
               if all(s <= cfg.max_latent_size and s % cfg.patch_size == 0 for s in p.scales)]
    top, patch = cfg.max_latent_size, cfg.patch_size
    example = sorted({max(patch, top * f // (4 * patch) * patch) for f in (2, 3, 4)})
    bounds = {1: "0,28", 2: "0,14,28", 3: "0,7,14,28"}[len(example)]
    raise ValueError(f"schedule scales {scales} do not fit this model: {bad} are not multiples of "
                     f"patch {patch} up to {top} (position grid {cfg.pos_embed_max_size} x patch {patch}); "
                     f"presets that fit: {fitting or 'none'}; e.g. --config.schedule.preset= "
                     f"--config.schedule.scales={','.join(map(str, example))} --config.schedule.boundaries={bounds}")


def check_scales_fit(scales: Sequence[int], cfg: MMDiTConfig | FluxConfig) -> None:
    """The trainer's check of the schedule's latent sizes against the model (swd-precompute runs it too)."""
    if isinstance(cfg, MMDiTConfig):
        check_schedule_fits(scales, cfg)
    for s in scales:  # FLUX: any even size (2x2 packing)
        try:
            backbone_of(cfg).module_cls(cfg).check_latent_size(s, s)
        except ValueError as e:
            raise ValueError(f"schedule scale {s} does not fit the model: {e}") from None


@dataclasses.dataclass
class Run:
    """A built run: models, mesh, base weights, sharded state and the shardings the steps are jitted with."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    transformer_config: MMDiTConfig | FluxConfig  # the transformer's config, whatever the backbone
    models: SwDModels
    base: dict
    base_shardings: Any
    state: dict
    state_shardings: Any
    block_groups: list[BlockGroup]  # how the transformer runs its blocks; base and state are in its layout

    def unrolled(self, tree):
        """`tree` (base weights, a state or part of one) in the stored, unrolled layout: what checkpoints, exports
        and the sampling pipeline hold. A jit places the copy with the same shardings per block."""
        return unstack_blocks(tree, self.block_groups)

    def unrolled_arrays(self, tree):
        """`unrolled` of device arrays as one jitted program (also for arrays sharded across processes)."""
        if all(g.size == 1 for g in self.block_groups):
            return tree
        return jax.jit(self.unrolled)(tree)

    def stacked(self, tree):
        """The inverse of `unrolled`: a stored tree in this run's layout."""
        return stack_blocks(tree, self.block_groups)


def without_remat(transformer):
    """`transformer` with every block run without remat, its blocks grouped as before (the same stacked layout:
    the weights of a run with remat serve it as they are)."""
    groups = transformer.block_groups()
    n = backbone_of(transformer.config).num_blocks(transformer.config)
    plain = transformer.clone(blocks_without_remat=n, scan_splits=tuple(sorted({g.stop - 1 for g in groups})))
    if [(g.start, g.size) for g in plain.block_groups()] != [(g.start, g.size) for g in groups]:
        raise AssertionError(f"without remat the blocks group as {plain.block_groups()}, not as {groups}")
    return plain


def interval_models(run: Run, k: int) -> SwDModels:
    """The models scale interval k runs: without remat where its latent is below `model.remat_from_scale` (the
    small intervals need far less memory; the numbers do not change, only what the backward recomputes)."""
    m, threshold = run.models, run.config.model.get("remat_from_scale", 0)
    if not m.transformer.remat or m.schedule.scale(k) >= threshold:
        return m
    return dataclasses.replace(m, transformer=without_remat(m.transformer))


def check_remat_from_scale(value, scales) -> None:
    """`model.remat_from_scale`: 0 (remat at every interval) or one of the schedule's scales, else one line."""
    if value != 0 and value not in scales:
        raise ValueError(f"model.remat_from_scale={value!r}: expected 0 (remat at every scale interval) or one of "
                         f"the schedule's scales {tuple(scales)} (intervals below it run without remat)")


def build_run(c: ml_collections.ConfigDict, devices=None) -> Run:
    """Check the config, load/shard the base weights, create student/fake LoRA, head and optimiser states.

    With DMD off there are no fake updates (official train.py): no fake LoRA, head or fake optimiser state.
    """
    mesh = sharding.make_mesh(c.mesh.shape, devices=devices)
    sharding.check_batch(c.train.batch_size, mesh)
    schedule = make_schedule(c)
    loss = loss_config(c)
    cfg, base = load_base(c, mesh)
    bb = backbone_of(cfg)
    n_blocks = bb.num_blocks(cfg)
    auto = {name: (default_feature_block(n_blocks),) for name in ("cls_blocks", "mmd_blocks")
            if not getattr(loss, name)}
    loss = dataclasses.replace(loss, **auto)
    for name in ("cls_blocks", "mmd_blocks"):
        bad = [b for b in getattr(loss, name) if not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"loss.{name} {bad} outside the model's blocks 0..{n_blocks - 1}")
    check_scales_fit(schedule.scales, cfg)
    guidance = model_guidance(cfg, c.model.get("guidance", None), loss.cfg_teacher, loss.guidance_teacher)
    if c.model.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={c.model.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if c.model.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={c.model.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if c.model.remat:
        check_remat(c.model.remat_policy, c.model.attention_impl)
    try:
        check_blocks_without_remat(c.model.blocks_without_remat, bb.num_blocks(cfg), c.model.remat)
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
    check_remat_from_scale(c.model.get("remat_from_scale", 0), schedule.scales)
    if c.model.attention_chunk < 8:
        raise ValueError(f"model.attention_chunk={c.model.attention_chunk}; expected at least 8 query rows")
    dtype = _dtype(c.model.dtype, "model.dtype")
    lora = LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets))
    transformer = bb.module_cls(cfg, lora=lora, dtype=dtype,
                                param_dtype=_dtype(c.model.param_dtype, "model.param_dtype"), remat=c.model.remat,
                                remat_policy=c.model.remat_policy, attention_impl=c.model.attention_impl,
                                blocks_without_remat=c.model.blocks_without_remat,
                                attention_chunk=c.model.attention_chunk, scan_blocks=c.model.get("scan_blocks", False),
                                scan_splits=tuple(sorted(set(loss.cls_blocks) | set(loss.mmd_blocks))))
    groups = transformer.block_groups()
    # The stacked layout of a scanned model, made once here; every stored form stays unrolled (models.block_scan).
    base_shardings = stack_blocks(jax.tree.map(lambda a: a.sharding, base), groups)
    if any(g.size > 1 for g in groups):
        base = jax.jit(lambda b: stack_blocks(b, groups), out_shardings=base_shardings, donate_argnums=0)(base)
    head = DiscriminatorHead(cfg.inner_dim, c.head.num_layers, dtype=dtype)
    models = SwDModels(transformer, head, schedule, loss, make_optimizer(c.optim.lr, c.optim),
                       make_optimizer(c.optim.lr_fake, c.optim), guidance)

    lora_model = bb.module_cls(cfg, lora=lora, param_dtype=jnp.float32)
    ex = bb.example_inputs(cfg, 1)

    def init_lora(key):
        return lora_model.init(key, *ex).get(LORA, {})  # no collection at all when no target matched

    abstract_lora = jax.eval_shape(init_lora, jax.random.key(0))
    if not jax.tree.leaves(abstract_lora):
        raise ValueError(f"lora.targets={tuple(c.lora.targets)} match no layer of the model; use diffusers module "
                         "names such as to_q, to_k, to_v, to_out.0, add_q_proj, to_add_out, net.0.proj, net.2")
    lora_shardings = sharding.boxed_shardings(abstract_lora, mesh, c.mesh.rules)
    head_init = lambda key: head.init(key, jnp.zeros((1, 1, cfg.inner_dim)))["params"]
    head_shardings = sharding.boxed_shardings(jax.eval_shape(head_init, jax.random.key(0)), mesh, c.mesh.rules)

    stacked_lora_shardings = stack_blocks(nn.unbox(lora_shardings), groups)

    def make_lora(key):  # drawn in the unrolled layout (the same numbers scanned or not), then stacked
        lora_tree = jax.lax.with_sharding_constraint(nn.unbox(init_lora(key)), nn.unbox(lora_shardings))
        return jax.lax.with_sharding_constraint(stack_blocks(lora_tree, groups), stacked_lora_shardings)

    def make_state(seed):
        key = jax.random.key(seed)
        k_student, k_fake, k_head = jax.random.split(key, 3)
        student = make_lora(k_student)
        fake = heads = None
        if models.loss.do_dmd:
            fake = make_lora(k_fake)
            heads = jax.lax.with_sharding_constraint(nn.unbox(head_init(k_head)), nn.unbox(head_shardings))
        return init_state(student, fake, heads, models, jax.random.key_data(jax.random.key(c.train.seed + 1)))

    with jax.set_mesh(mesh):
        state = jax.jit(make_state, static_argnums=0)(c.lora.init_seed)
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    return Run(c, mesh, cfg, models, base, base_shardings, state, state_shardings, groups)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
