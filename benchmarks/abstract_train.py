"""Shape-only SwD training programs at full SD3.5 size: abstract state, base, batches with shardings (no weights).

`lower_iteration(shape, mesh, k)` builds exactly the program `swd_jax.train.compile_iterations` jits (the
whole iteration of `make_iteration`, state donated, FSDP-sharded base) on abstract inputs, so
`.compile().memory_analysis()` gives the per-device memory and `.cost_analysis()` the FLOPs, without one
byte of weights. The models are assembled as `train.setup.build_run` does (same config fields, same
optimisers, the backbone of the model config: SD3.5's MMDiT or FLUX), the base from the published shapes.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from benchmarks.tiny import MICRO
from configs import flux_dev
from configs.common import base_config
from swd_jax.method.discriminator import DiscriminatorHead
from swd_jax.method.schedule import ScaleSchedule
from swd_jax.method.schedule import make_schedule
from swd_jax.models.backbone import backbone_of, model_guidance
from swd_jax.models.block_scan import stack_blocks
from swd_jax.models.flux import FLUX_DEV, FluxConfig
from swd_jax.models.layers import LORA, LoraConfig
from swd_jax.models.mmdit import SD35_LARGE, SD35_MEDIUM, MMDiTConfig
from swd_jax.train import sharding
from swd_jax.train.setup import DTYPES, loss_config, make_optimizer
from swd_jax.train.steps import SwDModels, init_state, make_iteration

SD35_TEXT_TOKENS = 77 + 256  # CLIP-L/G (77) joined with T5-XXL (256) on the token axis, width 4096
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """One SwD training setup: model shape, schedule, per-device batch and the loss settings that change cost."""
    name: str
    model: MMDiTConfig | FluxConfig
    schedule: str | ScaleSchedule  # a preset name of swd_jax.method.schedule, or a schedule
    batch_per_device: int
    cls_block: int
    cfg_teacher: float
    text_tokens: int = SD35_TEXT_TOKENS
    lora_rank: int = 64
    remat: bool = True
    remat_policy: str = "full"
    blocks_without_remat: int = 0
    attention_impl: str = "xla"
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    n_fake_steps: int = 5
    guidance: float | None = None  # FLUX-dev: the guidance-embedding input of student, fake model and teacher
    lora_targets: tuple[str, ...] | None = None  # None: configs/common.py's
    scan_blocks: bool = True  # model.scan_blocks: runs of identical blocks under one scan (False: unrolled)

    def config(self) -> ml_collections.ConfigDict:
        """The run config (configs/common.py defaults) this shape stands for."""
        c = base_config()
        c.model.dtype, c.model.param_dtype, c.model.remat = self.dtype, self.param_dtype, self.remat
        c.model.remat_policy, c.model.attention_impl = self.remat_policy, self.attention_impl
        c.model.blocks_without_remat = self.blocks_without_remat
        c.model.scan_blocks = self.scan_blocks
        if self.lora_targets is not None:
            c.lora.targets = self.lora_targets
        c.lora.rank, c.lora.alpha = self.lora_rank, float(self.lora_rank)
        if isinstance(self.schedule, str):
            c.schedule.preset = self.schedule
        else:
            c.schedule.preset = ""
            c.schedule.scales, c.schedule.boundaries = self.schedule.scales, self.schedule.boundaries
        c.loss.cls_blocks = c.loss.mmd_blocks = (self.cls_block,)
        c.loss.cfg_teacher = self.cfg_teacher
        c.loss.n_fake_steps = self.n_fake_steps
        if self.guidance is not None:
            c.model.guidance = c.loss.guidance_teacher = self.guidance
        return c


# The reference runs (METHOD.md s.5): 8 GPUs x 8 images (Medium), x 4 (Large); bf16 compute and base weights.
MEDIUM = TrainShape("SD3.5-Medium", SD35_MEDIUM, "sd35_medium_4", batch_per_device=8, cls_block=11, cfg_teacher=7.0)
LARGE = TrainShape("SD3.5-Large", SD35_LARGE, "sd35_large_4", batch_per_device=4, cls_block=20, cfg_teacher=4.5)
# configs/flux_dev.py's run: its schedule, guidance (through the embedding, no CFG batch), feature block and LoRA
# targets, read from the config itself.
_FLUX_RUN = flux_dev.get_config()
FLUX = TrainShape("FLUX.1-dev", FLUX_DEV, ScaleSchedule(tuple(_FLUX_RUN.schedule.scales),
                                                        tuple(_FLUX_RUN.schedule.boundaries)),
                  batch_per_device=4, cls_block=_FLUX_RUN.loss.cls_blocks[0], cfg_teacher=_FLUX_RUN.loss.cfg_teacher,
                  text_tokens=_FLUX_RUN.data.max_sequence_length, guidance=_FLUX_RUN.model.guidance,
                  lora_targets=tuple(_FLUX_RUN.lora.targets))


# A seconds-long stand-in for the tests: the benchmarks' micro model at latents 8 and 16, one fake update.
MICRO_TRAIN = TrainShape("micro", MMDiTConfig(**MICRO.mmdit_fields()), ScaleSchedule((8, 16), (0, 14, 28)),
                         batch_per_device=1, cls_block=0, cfg_teacher=7.0, text_tokens=MICRO.text_tokens, lora_rank=4,
                         dtype="float32", param_dtype="float32", n_fake_steps=1)
# Its FLUX-dev counterpart: one double- and two single-stream blocks, guidance through the embedding.
MICRO_FLUX_TRAIN = dataclasses.replace(
    MICRO_TRAIN, name="micro-flux", cls_block=1, cfg_teacher=1.0, guidance=4.5, lora_targets=FLUX.lora_targets,
    model=FluxConfig(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)))


def build_models(shape: TrainShape) -> SwDModels:
    """The SwD models of a run with this shape, assembled as `train.setup.build_run` does."""
    c = shape.config()
    dtype, pdt = DTYPES[shape.dtype], DTYPES[shape.param_dtype]
    lora = LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets))
    transformer = backbone_of(shape.model).module_cls(shape.model, lora=lora, dtype=dtype, param_dtype=pdt,
                                                      remat=shape.remat, remat_policy=shape.remat_policy,
                                                      blocks_without_remat=shape.blocks_without_remat,
                                                      attention_impl=c.model.attention_impl,
                                                      scan_blocks=shape.scan_blocks, scan_splits=(shape.cls_block,))
    head = DiscriminatorHead(shape.model.inner_dim, c.head.num_layers, dtype=dtype)
    loss = loss_config(c)
    guidance = model_guidance(shape.model, c.model.get("guidance", None), loss.cfg_teacher, loss.guidance_teacher)
    return SwDModels(transformer, head, make_schedule(c), loss,
                     make_optimizer(c.optim.lr, c.optim), make_optimizer(c.optim.lr_fake, c.optim), guidance)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_state(m: SwDModels, mesh, rules=sharding.DEFAULT_RULES):
    """(abstract state, state shardings): LoRA/head/optimiser leaves carry the shardings build_run gives them."""
    cfg = m.transformer.config
    bb = backbone_of(cfg)
    lora_model = bb.module_cls(cfg, lora=m.transformer.lora, param_dtype=jnp.float32)
    boxed_lora = jax.eval_shape(lambda k: lora_model.init(k, *bb.example_inputs(cfg, 1))[LORA], jax.random.key(0))
    boxed_head = jax.eval_shape(lambda k: m.head.init(k, jnp.zeros((1, 1, cfg.inner_dim)))["params"],
                                jax.random.key(0))
    lora, head = nn.unbox(boxed_lora), nn.unbox(boxed_head)
    lora_sh = sharding.boxed_shardings(boxed_lora, mesh, rules)
    head_sh = sharding.boxed_shardings(boxed_head, mesh, rules)
    groups = m.transformer.block_groups()  # the stacked layout of a scanned model, as build_run makes it
    lora, lora_sh = stack_blocks(lora, groups), stack_blocks(nn.unbox(lora_sh), groups)
    state = jax.eval_shape(lambda: init_state(lora, lora, head, m, jax.random.key_data(jax.random.key(0))))
    rep = sharding.replicated(mesh)
    fake_sh = {"lora": lora_sh, "head": head_sh}
    opt_sh = lambda opt, params, sh: optax.tree_map_params(opt, lambda _, s: s, params, sh,
                                                           transform_non_params=lambda _: rep)
    shardings = {"student": lora_sh, "fake": fake_sh,
                 "opt_student": opt_sh(m.opt_student, state["opt_student"], lora_sh),
                 "opt_fake": opt_sh(m.opt_fake, state["opt_fake"], fake_sh),
                 "step": rep, "key": rep}
    return _with_sharding(state, shardings), shardings


def abstract_base(shape: TrainShape, mesh, rules=sharding.DEFAULT_RULES, groups=()):
    """(abstract base weights in param_dtype, their FSDP shardings) as `train.setup.load_base` places them, in the
    layout of the model's block `groups` (stacked where scanned) as `train.setup.build_run` holds them."""
    boxed = backbone_of(shape.model).boxed_params(shape.model, DTYPES[shape.param_dtype])
    sh = stack_blocks(sharding.boxed_shardings(boxed, mesh, rules), groups)
    return _with_sharding(stack_blocks(nn.unbox(boxed), groups), sh), sh


def abstract_batches(shape: TrainShape, m: SwDModels, mesh, k: int):
    """Abstract [n_fake + 1, B, ...] float32 batches at interval k (global batch = per-device batch x devices)."""
    cfg, s = shape.model, m.schedule
    n, B = m.loss.n_fake_steps + 1, shape.batch_per_device * sharding.batch_divisor(mesh)
    sh = sharding.batch_sharding(mesh, leading_axes=1)
    f32 = lambda *dims: jax.ShapeDtypeStruct((n, B) + dims, jnp.float32, sharding=sh)
    batches = {"x": f32(s.scale(k), s.scale(k), cfg.latent_channels),
               "x_prev": f32(s.prev_scale(k), s.prev_scale(k), cfg.latent_channels),
               "context": f32(shape.text_tokens, cfg.joint_attention_dim),
               "pooled": f32(cfg.pooled_projection_dim)}
    rep = sharding.replicated(mesh)
    uncond = {"context": jax.ShapeDtypeStruct((1, shape.text_tokens, cfg.joint_attention_dim), jnp.float32,
                                              sharding=rep),
              "pooled": jax.ShapeDtypeStruct((1, cfg.pooled_projection_dim), jnp.float32, sharding=rep)}
    return batches, uncond


def iteration_program(shape: TrainShape, mesh, k: int | None = None, rules=sharding.DEFAULT_RULES):
    """(jitted iteration of interval k, its abstract arguments); k defaults to the last, full-resolution one."""
    m = build_models(shape)
    k = m.schedule.num_intervals - 1 if k is None else k
    state, state_sh = abstract_state(m, mesh, rules)
    base, base_sh = abstract_base(shape, mesh, rules, m.transformer.block_groups())
    batches, uncond = abstract_batches(shape, m, mesh, k)
    rep = sharding.replicated(mesh)
    fn = jax.jit(make_iteration(m, k), in_shardings=(state_sh, base_sh, batches["x"].sharding, rep),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
    return fn, (state, base, batches, uncond)


def lower_iteration(shape: TrainShape, mesh, k: int | None = None, rules=sharding.DEFAULT_RULES):
    """The lowered SwD iteration on abstract inputs, traced under the mesh and the logical-axis rules."""
    fn, args = iteration_program(shape, mesh, k, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        return fn.lower(*args)


def argument_bytes_per_device(args) -> int:
    """Bytes of one device's shards of abstract arguments (what `memory_analysis` counts as arguments)."""
    return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args)))


def memory_per_device(compiled) -> dict[str, float]:
    """GiB per device from `memory_analysis()`: arguments, outputs, temporaries, and the peak estimate."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory_analysis() for compiled programs")
    arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = ma.alias_size_in_bytes
    return {"arguments_gib": arg / GiB, "outputs_gib": out / GiB, "temp_gib": tmp / GiB, "alias_gib": alias / GiB,
            "peak_gib": (arg + out - alias + tmp) / GiB}
