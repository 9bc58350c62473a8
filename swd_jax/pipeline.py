"""SwDPipeline: prompts -> images from a diffusers SD3/SD3.5 or FLUX.1 folder and an optional SwD LoRA, in JAX.

    pipe = SwDPipeline.from_pretrained("/models/stable-diffusion-3.5-medium", lora="/runs/sd35m")
    images = pipe.generate(["a cat reading a newspaper"], seed=0)      # uint8 [N, 1024, 1024, 3]

`folder` holds transformer/, vae/, text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/ (a diffusers pipeline folder);
the transformer's `_class_name` picks the family (`swd_jax.models.backbone`): FLUX.1 (FluxTransformer2DModel) gets
FLUX's CLIP-L + T5 encoder (512 T5 tokens by default), the `flux_4` preset and, for FLUX-dev, the guidance scale
through the guidance embedding (default 4.5, as the published FLUX-SwD samples; schnell has none; no CFG);
`converted=` replaces its transformer by our converted params (`swd-convert`). `lora=` is a run's
workdir (its latest checkpointed student, with the run's LoRA config and scale schedule from its config.json),
a PEFT adapter folder (the published SwD adapters; with or without the text-stream targets) or a diffusers LoRA
file. Samplers (`SamplerSettings`): "scale_wise" (the student's: K steps, upscaling between scales; presets of
`swd_jax.method.schedule.PRESETS` or explicit scales + sigmas), "full_resolution" (the same sigmas at one size) and
"teacher" (the base model without the LoRA, many-step Euler: SD3 with CFG; FLUX as diffusers' FluxPipeline, its
dynamic-shift sigmas for the latent size, embedded guidance 3.5, no CFG). Batches are sharded over `devices` (data
parallel, a 1-D mesh; parameters replicated); every sampling step, the text encoders and the VAE decoder are
compiled once per shape and reused. On a TPU the transformer runs splash attention (per device, `shard_map`) and its
runs of identical blocks under one scan (weights stacked once at load, `swd_jax.models.block_scan`); elsewhere XLA
attention, unrolled (`attention_impl=` / `scan_blocks=` choose). Image n (prompt n // num_per_prompt) gets its
own seed `seed + n`, so an image does not depend on the batch size or the device count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax import storage
from swd_jax.convert.converted import load_converted, load_diffusers
from swd_jax.convert.flux_prompt_encoding import FluxPromptEncoder, load_prompt_encoder
from swd_jax.convert.folders import (NOT_TRANSFORMER, PIPELINE_PARTS, from_hub, hub_id, local_model_folder, read_json,
                                     source_path)
from swd_jax.convert.peft_lora import adapter_files, import_lora
from swd_jax.convert.prompt_encoding import SD3PromptEncoder
from swd_jax.convert.transformer import transformer_class, transformer_folder
from swd_jax.convert.vae import load_vae
from swd_jax.eval.prompts import sample_seed
from swd_jax.method.sampler import SamplerNoise, euler_sample, scale_wise_sample
from swd_jax.method.schedule import (
    FLUX_DEV_SCHEDULER,
    ScaleSchedule,
    flow_match_sigmas,
    flux_dynamic_sigmas,
    get_schedule,
    make_schedule,
)
from swd_jax.models.backbone import backbone_of, backbone_of_class
from swd_jax.models.block_scan import stack_blocks
from swd_jax.models.flux import FluxConfig
from swd_jax.models.layers import ATTENTION_IMPLS, LORA, SPLASH_IMPLS, LoraConfig
from swd_jax.models.mmdit import MMDiTConfig
from swd_jax.models.vae import decode_latents

SAMPLERS = ("scale_wise", "full_resolution", "teacher")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_PRESET = "sd35_medium_6"  # the published SwD-Medium default
TEACHER_GUIDANCE = 7.0  # the reference's SD3.5-Medium CFG (Large: 4.5)
FLUX_GUIDANCE = 4.5  # the published FLUX-SwD's embedded guidance scale (FLUX-dev)
FLUX_TEACHER_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (FLUX-dev's embedded guidance)
ATTENTION_CHOICES = ("auto",) + ATTENTION_IMPLS  # auto: splash on a TPU, else xla
ATTENTION_PLATFORMS = {"splash": "tpu", "splash_fused": "tpu", "cudnn": "gpu"}
BATCH_RULES = (("activation_batch", "data"),)  # splash's shard_map: the batch over the pipeline's 1-D mesh


def resolve_attention(impl: str | None, platform: str) -> str:
    """The attention kernel to run on `platform`: `impl`, or for None/"auto" splash on a TPU, else xla."""
    if impl in (None, "auto"):
        return "splash" if platform == "tpu" else "xla"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention {impl!r}; choose one of {ATTENTION_CHOICES}")
    need = ATTENTION_PLATFORMS.get(impl)
    if need is not None and platform != need:
        from swd_jax.models import splash
        if not (impl in SPLASH_IMPLS and splash.INTERPRET):  # tests run the kernel in interpret mode on CPU
            raise ValueError(f"attention {impl!r} needs a {need.upper()} (these devices are {platform}); "
                             "choose xla or chunked")
    return impl


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What `generate` runs: `kind`, K latent sizes, K+1 sigmas (last 0), CFG scale (1 = none) and FLUX-dev's
    embedded guidance scale (None: the model has no guidance embedding)."""

    kind: str
    scales: tuple[int, ...]
    sigmas: tuple[float, ...]
    guidance_scale: float
    embedded_guidance: float | None = None

    def to_json(self) -> dict:
        return {"sampler": self.kind, "scales": list(self.scales), "sigmas": [round(s, 6) for s in self.sigmas],
                "guidance_scale": self.guidance_scale, "embedded_guidance": self.embedded_guidance}


def make_sampler(kind: str = "scale_wise", schedule: str | ScaleSchedule | tuple | None = None, *, steps: int = 28,
                 shift: float = 3.0, guidance_scale: float | None = None, size: int | None = None,
                 patch_size: int = 2, flux_scheduler: dict | None = None) -> SamplerSettings:
    """Validated SamplerSettings. `schedule`: a preset name, a ScaleSchedule or (scales, sigmas) with K+1 sigmas
    ending in 0. full_resolution: the schedule's sigmas, every step at `size` (default its last scale). teacher:
    `steps` Euler steps on the flow-matching grid with `shift`, at `size`, CFG `guidance_scale` (default 7); with
    `flux_scheduler` (a FLUX folder's scheduler config) FluxPipeline's sigmas for `size` instead, and no CFG."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r}; choose one of {SAMPLERS}")
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    elif schedule is None:
        schedule = get_schedule(DEFAULT_PRESET)
    elif not isinstance(schedule, ScaleSchedule):
        try:
            scales, sigmas = schedule
        except (TypeError, ValueError):
            raise ValueError("schedule must be a preset name, a ScaleSchedule or a (scales, sigmas) pair") from None
        schedule = ScaleSchedule(scales=tuple(scales), explicit_sigmas=tuple(float(s) for s in sigmas),
                                 patch_size=patch_size)
    size = int(size or schedule.scales[-1])
    if size <= 0 or size % patch_size:
        raise ValueError(f"size {size} must be a positive multiple of the patch size {patch_size}")
    sigmas = tuple(float(s) for s in schedule.sampling_sigmas)
    if kind == "scale_wise":
        scales, default_g = schedule.scales, 1.0
    elif kind == "full_resolution":
        scales, default_g = (size,) * schedule.num_intervals, 1.0
    else:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"teacher steps must be a positive int, got {steps!r}")
        if flux_scheduler is None:
            scales, default_g = (size,), TEACHER_GUIDANCE
            sigmas = tuple(float(s) for s in flow_match_sigmas(steps, shift))
        else:  # FluxPipeline: image_seq_len = the packed 2x2 tokens; guidance only through the embedding
            scales, default_g = (size,), 1.0
            sigmas = tuple(float(s) for s in flux_dynamic_sigmas(steps, (size // 2) ** 2, flux_scheduler))
    g = default_g if guidance_scale is None else float(guidance_scale)
    if g < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {g}")
    return SamplerSettings(kind, tuple(int(s) for s in scales), sigmas, g)


@dataclasses.dataclass(frozen=True)
class Student:
    """A LoRA to sample with: its config and factors, where it came from, and the schedule of its run if any."""

    lora: LoraConfig
    params: dict
    source: str
    schedule: ScaleSchedule | None = None
    run_config: dict | None = None


def _is_run(path: str) -> bool:
    """A training workdir (local or gs://): config.json and checkpoints/ or student_peft/."""
    names = storage.listdir(path)
    return "config.json" in names and any(d in names and storage.isdir(storage.join(path, d))
                                          for d in ("checkpoints", "student_peft"))


def _latest_checkpoint(ckpt_dir: str) -> str | None:
    steps = [int(d) for d in storage.listdir(ckpt_dir)
             if d.isdigit() and storage.isdir(storage.join(ckpt_dir, d, "state"))]
    return storage.join(ckpt_dir, str(max(steps)), "state") if steps else None


def load_student(path: str, cfg: MMDiTConfig | FluxConfig, dtype=jnp.float32) -> Student:
    """A run workdir (latest checkpointed student, else its student_peft/), a PEFT folder or a diffusers LoRA file;
    local or gs:// (checkpoints are read from there by orbax, adapters downloaded to a local cache)."""
    path = storage.resolve(path)  # orbax reads no metadata through a relative path
    if not storage.exists(path):
        raise FileNotFoundError(f"no LoRA adapter or run workdir at {path}")
    if not _is_run(path):
        lora, params = import_lora(storage.local_copy(path, what="LoRA adapter"), cfg, dtype)
        return Student(lora, params, path)
    import ml_collections
    import orbax.checkpoint as ocp

    from swd_jax.convert.orbax_params import check_matches, tree_metadata
    from swd_jax.convert.peft_lora import abstract_lora

    run_config = read_json(storage.join(path, "config.json"), "run config")
    c = ml_collections.ConfigDict(run_config)
    schedule = make_schedule(c)
    state_dir = _latest_checkpoint(storage.join(path, "checkpoints"))
    if state_dir is None:
        peft = storage.join(path, "student_peft")
        lora, params = import_lora(storage.local_copy(peft, what="LoRA adapter"), cfg, dtype)
        return Student(lora, params, peft, schedule, run_config)
    lora = LoraConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha), targets=tuple(c.lora.targets))
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = tree_metadata(state_dir)  # not Checkpointer.metadata: <step>/state has no step metadata of its own
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), stored)
        if "student" not in target:
            raise ValueError(f"{state_dir}: a training checkpoint without a 'student' entry")
        check_matches(stored["student"], abstract_lora(cfg, lora), f"{state_dir} (student)")
        student = ckptr.restore(state_dir, target)["student"]
    return Student(lora, jax.tree.map(lambda x: jnp.asarray(x, dtype), student), state_dir, schedule, run_config)


@functools.partial(jax.jit, static_argnames=("shapes",))
def _draw_noise(seeds_B, shapes: tuple[tuple[int, ...], ...]):
    """Per-image noise: image b, draw j = normal(fold_in(key(seeds[b]), j), shapes[j]) (independent of batching)."""
    keys = jax.vmap(jax.random.key)(seeds_B)
    return tuple(jax.vmap(lambda k, j=j, s=s: jax.random.normal(jax.random.fold_in(k, j), s, jnp.float32))(keys)
                 for j, s in enumerate(shapes))


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_uint8(vae, params, x_BHWC):
    """Latent -> uint8 image as diffusers' VaeImageProcessor: round(clip(x / 2 + 0.5, 0, 1) * 255)."""
    img = decode_latents(vae, params, x_BHWC)
    return jnp.round(jnp.clip(img / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


class SwDPipeline:
    """Text encoders, MMDiT or Flux (+ LoRA) and VAE decoder, loaded once; `generate(prompts, ...)` -> images."""

    def __init__(self, cfg: MMDiTConfig | FluxConfig, base: dict, encoder: SD3PromptEncoder | FluxPromptEncoder,
                 vae, vae_params: dict, *,
                 student: Student | None = None, dtype: str = "float32", mesh: jax.sharding.Mesh,
                 model_folder: str = "", transformer_source: str = "", local_folder: str = "",
                 attention_impl: str | None = None, scan_blocks: bool | None = None):
        """`model_folder`: where the model is (local or gs://); `local_folder`: its local copy (default the same).
        `attention_impl`: one of ATTENTION_CHOICES (None/"auto": splash on a TPU, else xla); `scan_blocks`: run
        runs of identical blocks under one scan (None: on a TPU). `base` and the student's LoRA are given in the
        stored (unrolled) layout, or already stacked; with scan they are stacked here, once."""
        self.local_folder = local_folder or model_folder
        self.cfg, self.encoder, self.vae, self.student, self.dtype, self.mesh = cfg, encoder, vae, student, dtype, mesh
        platform = mesh.devices.flat[0].platform
        self.attention_impl = resolve_attention(attention_impl, platform)
        self.scan_blocks = platform == "tpu" if scan_blocks is None else bool(scan_blocks)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self.model_folder, self.transformer_source = model_folder, transformer_source
        self.backbone = backbone_of(cfg)
        model = self.backbone.module_cls(cfg, lora=None if student is None else student.lora, dtype=DTYPES[dtype],
                                         param_dtype=DTYPES[dtype], attention_impl=self.attention_impl,
                                         scan_blocks=self.scan_blocks)
        self.block_groups = model.block_groups()
        self.base = self._placed(base)
        self.vae_params = jax.device_put(vae_params, self.replicated)
        self.lora = None if student is None else student.params

        def apply(variables, x_BHWC, t_B, cond):  # FLUX-dev: + the embedded guidance scale per example
            extra = (cond["guidance"],) if "guidance" in cond else ()
            return model.apply(variables, x_BHWC, t_B, cond["context"], cond["pooled"], *extra)

        def teacher(params, x_BHWC, t_B, cond):  # the base model (a LoraDense without factors is its Dense)
            return apply({"params": params["base"]}, x_BHWC, t_B, cond)

        def student_fn(params, x_BHWC, t_B, cond):
            return apply({"params": params["base"], LORA: params["lora"]}, x_BHWC, t_B, cond)

        # made once: the sampler's jitted steps are cached per velocity function object
        self._teacher, self._student = teacher, (student_fn if student is not None else teacher)

    def _placed(self, params):
        """`params` replicated on the mesh, in the layout the model runs (stacked where its blocks are scanned)."""
        params = jax.device_put(params, self.replicated)
        if not self.scan_blocks:
            return params
        return jax.jit(lambda p: stack_blocks(p, self.block_groups), out_shardings=self.replicated)(params)

    @property
    def lora(self) -> dict | None:
        """The student's LoRA factors as the model runs them; assign them in the stored layout (or stacked)."""
        return self._lora

    @lora.setter
    def lora(self, params: dict | None) -> None:
        self._lora = None if params is None else self._placed(params)

    def _attention_context(self):
        """Splash is a per-device kernel: trace under the pipeline's mesh, the batch over its axis (`shard_map`)."""
        if self.attention_impl not in SPLASH_IMPLS:
            return contextlib.nullcontext()
        import flax.linen as nn
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(list(BATCH_RULES)))
        return stack

    @classmethod
    def from_pretrained(cls, folder: str, *, lora: str | None = None, converted: str | None = None,
                        dtype: str = "float32", max_sequence_length: int | None = None,
                        devices: Sequence[jax.Device] | None = None, attention_impl: str | None = None,
                        scan_blocks: bool | None = None) -> SwDPipeline:
        """Load a diffusers SD3/SD3.5 or FLUX.1 pipeline folder (or `converted` params + that folder) and an
        optional LoRA. `max_sequence_length`: T5 tokens, default the family's (SD3 256, FLUX 512).
        `attention_impl` (default: splash on a TPU, else xla) and `scan_blocks` (default: on a TPU): see __init__."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        if hub_id(folder) is None:  # else a Hub id, fetched below (only the parts read)
            folder = storage.resolve(folder)
            if not storage.isdir(folder):
                raise FileNotFoundError(f"model folder {folder} does not exist")
        devices = list(devices or jax.local_devices())
        resolve_attention(attention_impl, devices[0].platform)  # refused before anything loads
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        pdt = DTYPES[dtype]
        run_config = None
        if lora is not None:
            lora = storage.resolve(from_hub(lora, None, "LoRA adapter"))  # a Hub id: its snapshot
            if not storage.exists(lora):
                raise FileNotFoundError(f"no LoRA adapter or run workdir at {lora}")
        if lora is not None and not _is_run(lora):  # not a run: an adapter, checked before the model loads
            adapter_files(storage.local_copy(lora, what="LoRA adapter"))
        elif lora is not None:
            run_config = read_json(storage.join(lora, "config.json"), "run config")
            model = run_config.get("model", {})
            path = model.get("path") or ""
            if converted is None and model.get("source") in ("converted", "auto") and path and storage.exists(
                    storage.join(path, "conversion.json")):
                converted = path  # the run's own base weights (a converted checkpoint)
        local = local_model_folder(folder, parts=PIPELINE_PARTS if converted is None else NOT_TRANSFORMER)
        if converted is not None:
            cfg, base = load_converted(converted)
            base = jax.tree.map(lambda x: x.astype(pdt), base)
            source = storage.resolve(converted)
        else:
            import flax.linen as nn
            sub = os.path.join(local, "transformer")
            tfolder = sub if os.path.isdir(sub) else transformer_folder(local)
            family = backbone_of_class(transformer_class(tfolder))
            cfg = family.config_cls.from_folder(tfolder)
            shardings = jax.tree.map(lambda _: rep, nn.unbox(family.boxed_params(cfg, pdt)))
            _, base = load_diffusers(tfolder, dtype=pdt, shardings=shardings)
            source = source_path(folder, local, tfolder) if local != folder else os.path.abspath(tfolder)
        student = None if lora is None else load_student(lora, cfg)
        vae_dir = os.path.join(local, "vae")
        if not os.path.isdir(vae_dir):
            raise FileNotFoundError(f"model folder {folder} has no vae/ to decode images with")
        vae, vae_params = load_vae(vae_dir, pdt, pdt)
        length = max_sequence_length or backbone_of(cfg).max_sequence_length
        encoder = load_prompt_encoder(local, max_sequence_length=length, dtype=pdt, param_dtype=pdt, sharding=rep)
        if isinstance(encoder, FluxPromptEncoder) != isinstance(cfg, FluxConfig):
            raise ValueError(f"model folder {folder} holds {type(encoder).__name__}'s text encoders but the "
                             f"transformer ({source}) is a {backbone_of(cfg).diffusers_class}")
        return cls(cfg, base, encoder, vae, vae_params, student=student, dtype=dtype, mesh=mesh,
                   model_folder=folder, transformer_source=source, local_folder=local,
                   attention_impl=attention_impl, scan_blocks=scan_blocks)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    def sampler(self, kind: str = "scale_wise", schedule=None, *, guidance_scale: float | None = None,
                **kwargs) -> SamplerSettings:
        """`make_sampler` with this pipeline's defaults: the run's schedule when the LoRA is a run's student, else
        the family's preset (SD3: sd35_medium_6, FLUX: flux_4). FLUX: `guidance_scale` is the embedded one; the
        FLUX teacher is FluxPipeline's: the folder's scheduler config (dynamic shifting), embedded guidance 3.5."""
        if schedule is None and self.student is not None and self.student.schedule is not None:
            schedule = self.student.schedule
        schedule = self.backbone.sample_preset if schedule is None else schedule
        embedded = None
        if isinstance(self.cfg, FluxConfig):
            embedded, guidance_scale = self.embedded_guidance(guidance_scale, teacher=kind == "teacher"), None
            if kind == "teacher":
                kwargs["flux_scheduler"] = self.flux_scheduler()[1]
        s = make_sampler(kind, schedule, patch_size=self.backbone.latent_multiple(self.cfg),
                         guidance_scale=guidance_scale, **kwargs)
        s = dataclasses.replace(s, embedded_guidance=embedded)
        for size in s.scales:
            if size > getattr(self.cfg, "max_latent_size", size):
                raise ValueError(f"latent size {size} exceeds the model's largest, {self.cfg.max_latent_size} "
                                 f"(pos_embed_max_size x patch size)")
        return s

    def embedded_guidance(self, given: float | None, teacher: bool = False) -> float | None:
        """FLUX-dev's guidance-embedding input: `given`, else (student) the run's model.guidance, else 4.5 (teacher:
        FluxPipeline's 3.5); schnell: None."""
        if not getattr(self.cfg, "guidance_embeds", False):
            if given is not None:
                raise ValueError(f"guidance {given}: this FLUX model has no guidance embedding (FLUX-schnell) and "
                                 "no CFG here; leave the guidance unset")
            return None
        if given is None and not teacher and self.student is not None and self.student.run_config:
            given = self.student.run_config.get("model", {}).get("guidance")
        g = (FLUX_TEACHER_GUIDANCE if teacher else FLUX_GUIDANCE) if given is None else float(given)
        if not g > 0:
            raise ValueError(f"guidance {g}: FLUX-dev's embedded guidance scale must be positive (e.g. 4.5)")
        return g

    def flux_scheduler(self) -> tuple[str, dict]:
        """(source, config) of the FLUX teacher's sigmas: the folder's scheduler/scheduler_config.json, else
        FLUX.1-dev's values (`swd_jax.method.schedule.FLUX_DEV_SCHEDULER`)."""
        remote = storage.is_remote(self.model_folder)  # then read from its local copy
        path = os.path.join(self.local_folder if remote else self.model_folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(path):
            return "FLUX.1-dev defaults", dict(FLUX_DEV_SCHEDULER)
        try:
            with open(path) as f:
                config = json.load(f)
            name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
            if name != "FlowMatchEulerDiscreteScheduler":
                raise ValueError(f"_class_name {name!r}; the FLUX teacher needs FlowMatchEulerDiscreteScheduler")
            flux_dynamic_sigmas(1, 1, config)  # checks its fields
        except ValueError as e:  # json.JSONDecodeError included
            raise ValueError(f"{path}: {e}") from None
        return (storage.join(self.model_folder, "scheduler", "scheduler_config.json") if remote else path), config

    def settings(self, sampler: SamplerSettings) -> dict:
        """Every setting an image depends on (besides its prompt and seed), for images.json."""
        uses_lora = sampler.kind != "teacher" and self.student is not None
        flux_teacher = sampler.kind == "teacher" and isinstance(self.cfg, FluxConfig)
        return {**sampler.to_json(), "model": self.model_folder, "transformer": self.transformer_source,
                "lora": self.student.source if uses_lora else None, "dtype": self.dtype,
                "max_sequence_length": self.encoder.max_sequence_length,
                "size_px": sampler.scales[-1] * self.vae_factor,
                **({"scheduler": self.flux_scheduler()[0]} if flux_teacher else {})}

    def encode(self, prompts: Sequence[str]) -> dict:
        """Prompts (a multiple of the device count) -> {context, pooled} sharded over the batch."""
        ids = jax.device_put(self.encoder.tokenize(prompts), self.batch_sharding)
        context, pooled = self.encoder.encode_ids(ids)
        return {"context": context, "pooled": pooled}

    def _uncond(self, batch: int) -> dict:
        context, pooled = self.encoder.unconditional(batch)
        return jax.device_put({"context": context, "pooled": pooled}, self.batch_sharding)

    def sample_latents(self, cond: dict, seeds: Sequence[int], sampler: SamplerSettings,
                       noise: SamplerNoise | None = None) -> jax.Array:
        """Final latents [B, s, s, C] for conditioning `cond`; noise from the per-image `seeds` unless given."""
        b, c = len(seeds), self.cfg.latent_channels
        if noise is None:
            shapes = tuple((s, s, c) for s in sampler.scales)
            drawn = _draw_noise(jax.device_put(np.asarray(seeds, np.uint32), self.batch_sharding), shapes)
            noise = SamplerNoise(drawn[0], tuple(drawn[1:]))
        if sampler.embedded_guidance is not None:
            cond = {**cond, "guidance": jax.device_put(np.full((b,), sampler.embedded_guidance, np.float32),
                                                       self.batch_sharding)}
        guided = sampler.guidance_scale > 1.0
        uncond = self._uncond(b) if guided else None
        with self._attention_context():
            if sampler.kind == "teacher":
                # timestep float32(sigma) * 1000 = the scheduler's; FluxPipeline passes it / 1000 and diffusers' FLUX
                # multiplies by 1000 again, a float32 round trip that returns the same value (1e6 random sigmas
                # checked)
                return euler_sample(self._teacher, {"base": self.base}, noise.init_BHWC, sampler.sigmas, cond,
                                    uncond=uncond, guidance_scale=sampler.guidance_scale)
            params = {"base": self.base} if self.lora is None else {"base": self.base, "lora": self.lora}
            return scale_wise_sample(self._student, params, cond, None, (sampler.scales, sampler.sigmas),
                                     batch_size=b, channels=c, uncond=uncond, guidance_scale=sampler.guidance_scale,
                                     noise=noise)

    def decode(self, latents_BHWC: jax.Array) -> np.ndarray:
        """Normalised latents -> uint8 images [B, H, W, 3] on the host."""
        return np.asarray(jax.device_get(_decode_uint8(self.vae, self.vae_params, latents_BHWC)))

    def generate_batches(self, prompts: Sequence[str], sampler: SamplerSettings | None = None, *, seed: int = 0,
                         num_per_prompt: int = 1, batch_size: int | None = None, indices: Sequence[int] | None = None,
                         progress: bool = False) -> Iterator[tuple[list[dict], np.ndarray, float]]:
        """Yield (records, uint8 images, seconds) per batch; record = {index, prompt, seed}. `indices` picks which
        images (of len(prompts) * num_per_prompt) to make, e.g. one host's share. The last batch is padded to
        the batch size (one compiled shape), the padding dropped."""
        sampler = sampler or self.sampler()
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of str")
        if num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
        n_dev = self.num_devices
        batch = -(-(batch_size or n_dev) // n_dev) * n_dev  # a multiple of the device count
        total = len(prompts) * num_per_prompt
        indices = list(range(total)) if indices is None else [int(i) for i in indices]
        items = [{"index": i, "prompt": prompts[i // num_per_prompt], "seed": sample_seed(seed, i)} for i in indices]
        from tqdm.auto import tqdm
        with tqdm(total=len(items), unit="img", desc=sampler.kind, disable=not progress) as bar:
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                padded = chunk + [chunk[-1]] * (batch - len(chunk))
                t0 = time.perf_counter()
                cond = self.encode([r["prompt"] for r in padded])
                latents = self.sample_latents(cond, [r["seed"] for r in padded], sampler)
                images = self.decode(latents)[:len(chunk)]
                dt = time.perf_counter() - t0
                bar.update(len(chunk))
                yield chunk, images, dt

    def generate(self, prompts: Sequence[str], sampler: str | SamplerSettings = "scale_wise", *, seed: int = 0,
                 num_per_prompt: int = 1, batch_size: int | None = None, progress: bool = False,
                 **sampler_kwargs: Any) -> np.ndarray:
        """uint8 images [len(prompts) * num_per_prompt, H, W, 3]; `sampler` a kind (with `make_sampler`'s
        keyword arguments: schedule, steps, guidance_scale, size) or SamplerSettings."""
        settings = sampler if isinstance(sampler, SamplerSettings) else self.sampler(sampler, **sampler_kwargs)
        out = [images for _, images, _ in self.generate_batches(prompts, settings, seed=seed,
                                                                num_per_prompt=num_per_prompt,
                                                                batch_size=batch_size, progress=progress)]
        return np.concatenate(out, axis=0)
