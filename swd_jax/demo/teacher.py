"""Flow-matching pretraining of a small MMDiT teacher (the demo's base model), saved as a converted checkpoint.

Rectified-flow objective of SD3 (METHOD.md s.1): x_sigma = sigma * eps + (1 - sigma) * x0, the model predicts
v = eps - x0 at timestep 1000 * sigma, loss = mean (v_hat - v)^2. sigma is drawn per example, logit-normal
(SD3's default, m = 0, s = 1) or uniform, then shifted like the sampling grid, s' = shift s / (1 + (shift-1) s).
Classifier-free guidance is learnt by replacing the prompt with the empty prompt for a fraction of examples.
Multi-resolution: with `scales`, step i trains on the images area-downscaled to scales[i mod len(scales)], so
the teacher is a good denoiser at every size a scale-wise schedule visits (as SD3.5, trained at many sizes).
One jitted step (params, AdamW state, EMA of params, step, key); the state is checkpointed with orbax, so an
interrupted run resumes. The result is written in the converter's layout (`config.json`, `conversion.json`,
`params/`), which the SwD trainer reads with `model.source="converted"`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from swd_jax.convert.orbax_params import abstract_like, save_params
from swd_jax.demo.toy_data import area_down
from swd_jax.method.schedule import add_noise
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from swd_jax.models.mmdit import example_inputs
from swd_jax.train.checkpoint import Checkpointer
from swd_jax.train.progress import Progress

CONFIG, META, PARAMS = "config.json", "conversion.json", "params"


@dataclasses.dataclass(frozen=True)
class TeacherTraining:
    """Hyperparameters of the flow-matching pretraining."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    sigma_sampling: str = "logit_normal"
    shift: float = 3.0
    seed: int = 0
    ckpt_every: int = 250
    scales: tuple[int, ...] = ()  # latent sizes cycled step by step (multi-resolution); () = sample_size only

    def __post_init__(self):
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sigma_sampling={self.sigma_sampling!r}; expected 'logit_normal' or 'uniform'")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond={self.p_uncond} must lie in [0, 1)")
        object.__setattr__(self, "scales", tuple(int(v) for v in self.scales))
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"need steps >= 1 and batch_size >= 1, got {self.steps}, {self.batch_size}")


def sample_sigmas(key, n: int, kind: str, shift: float) -> jnp.ndarray:
    """n training sigmas: logit-normal (sigmoid of N(0, 1)) or uniform, then the time shift."""
    if kind == "logit_normal":
        s = jax.nn.sigmoid(jax.random.normal(key, (n,)))
    else:
        s = jax.random.uniform(key, (n,))
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_matching_loss(model: MMDiT, params, x0_BHWC, eps_BHWC, sigma_B, context_BTJ, pooled_BP) -> jnp.ndarray:
    """mean (v_theta(x_sigma, 1000 sigma) - (eps - x0))^2, x_sigma = sigma eps + (1 - sigma) x0."""
    x = add_noise(x0_BHWC, eps_BHWC, sigma_B)
    v = model.apply({"params": params}, x, 1000.0 * sigma_B, context_BTJ, pooled_BP)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (eps_BHWC - x0_BHWC)))


def make_optimizer(t: TeacherTraining) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW; the rate warms up linearly, then decays (cosine) to 5% at the last step."""
    lr = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup, 1), max(t.steps, t.warmup + 1), 0.05 * t.lr)
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), optax.adamw(lr, weight_decay=t.weight_decay))


def make_train_step(model: MMDiT, opt: optax.GradientTransformation, t: TeacherTraining):
    """(state, batch{x, context, pooled, uncond_context, uncond_pooled}) -> (state, metrics); jit it, donate state."""

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        k_sigma, k_eps, k_drop = jax.random.split(key, 3)
        x0 = batch["x"]
        B = x0.shape[0]
        drop = jax.random.uniform(k_drop, (B,)) < t.p_uncond
        ctx = jnp.where(drop[:, None, None], batch["uncond_context"], batch["context"])
        pooled = jnp.where(drop[:, None], batch["uncond_pooled"], batch["pooled"])
        sigma = sample_sigmas(k_sigma, B, t.sigma_sampling, t.shift)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        loss, grads = jax.value_and_grad(flow_matching_loss, argnums=1)(model, state["params"], x0, eps, sigma,
                                                                         ctx, pooled)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        n = state["step"].astype(jnp.float32)
        decay = jnp.minimum(t.ema_decay, (1.0 + n) / (10.0 + n))  # short-run warmup of the EMA
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        new = dict(state, params=params, opt=opt_state, ema=ema, step=state["step"] + 1)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def init_params(cfg: MMDiTConfig, seed: int, text_tokens: int) -> dict:
    """Fresh MMDiT params (float32) from the module's own initialisers."""
    model = MMDiT(cfg)
    args = example_inputs(cfg, 1, cfg.sample_size, text_tokens)
    return jax.jit(lambda k: nn.unbox(model.init(k, *args)["params"]))(jax.random.key(seed))


def train_teacher(cfg: MMDiTConfig, t: TeacherTraining, images_NHWC: np.ndarray, context_NTJ: np.ndarray,
                  pooled_NP: np.ndarray, uncond: tuple[np.ndarray, np.ndarray], workdir: str,
                  stop_after: int | None = None) -> tuple[dict, list[float]]:
    """Train (or resume) the teacher on (images, per-image text embeddings); returns (EMA params, losses).

    One compiled step per training scale (the jitted step retraces per shape).
    Batches are drawn with replacement by a generator seeded with (seed, step), so a resumed run sees exactly
    the batches an uninterrupted one would. Checkpoints go to `workdir/checkpoints`.
    """
    if images_NHWC.shape[1:] != (cfg.sample_size, cfg.sample_size, cfg.in_channels):
        raise ValueError(f"images {images_NHWC.shape[1:]} do not match the model's "
                         f"{(cfg.sample_size, cfg.sample_size, cfg.in_channels)}")
    scales = t.scales or (cfg.sample_size,)
    bad = [s for s in scales if s > cfg.sample_size or s % cfg.patch_size]
    if bad:
        raise ValueError(f"teacher scales {bad} must be <= sample_size {cfg.sample_size} and divisible by "
                         f"patch_size {cfg.patch_size}")
    pyramid = {s: area_down(images_NHWC, s) for s in set(scales)}
    model, opt = MMDiT(cfg), make_optimizer(t)
    params = init_params(cfg, t.seed, context_NTJ.shape[1])
    state = {"params": params, "opt": opt.init(params), "ema": jax.tree.map(jnp.copy, params),
             "step": jnp.zeros((), jnp.int32), "key": jax.random.key_data(jax.random.key(t.seed + 1))}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.ckpt_every, keep=1)
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        state = restored[0]
        print(f"teacher: resumed from step {int(state['step'])}", file=sys.stderr)
    step_fn = jax.jit(make_train_step(model, opt, t), donate_argnums=(0,))
    u_ctx, u_pooled = (np.broadcast_to(u, (t.batch_size,) + u.shape[1:]) for u in uncond)
    start = int(state["step"])
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    losses, pending = [], None
    bar = Progress(t.steps, start, "teacher (flow matching)")
    compiled: set[int] = set()  # scales whose step has compiled: a step that compiles is not timed for the ETA

    def log(pending, compiled_meanwhile: bool):
        losses.append(_check(*pending))
        bar.update(1, compiled=compiled_meanwhile or pending[1] == start)  # the first includes its own compile
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    try:
        for i in range(start, end):
            idx = np.random.default_rng((t.seed, i)).integers(0, len(images_NHWC), t.batch_size)
            batch = {"x": pyramid[scales[i % len(scales)]][idx], "context": context_NTJ[idx],
                     "pooled": pooled_NP[idx], "uncond_context": u_ctx, "uncond_pooled": u_pooled}
            new_scale = batch["x"].shape[1] not in compiled
            compiled.add(batch["x"].shape[1])
            state, metrics = step_fn(state, batch)  # compiles first at a new scale
            if pending is not None:  # read step i-1's loss while step i runs (and its compile fell in that time)
                log(pending, new_scale)
            pending = (metrics, i)
            if (i + 1) % t.ckpt_every == 0 or i + 1 == end:  # never save a state whose loss was not checked
                log(pending, False)
                pending = None
                ckpt.save(i + 1, state, force=True)
    finally:
        bar.close()
        ckpt.close()
    return state["ema"], losses


def _check(metrics, step: int) -> float:
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"teacher training: non-finite loss at step {step}; lower teacher.lr")
    return loss


def save_teacher(folder: str, cfg: MMDiTConfig, params, info: dict | None = None) -> None:
    """Write the converter's layout: config.json (diffusers field names), conversion.json, params/ (orbax)."""
    os.makedirs(folder, exist_ok=True)
    save_params(os.path.join(folder, PARAMS), params, overwrite=True)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"teacher params mix dtypes {sorted(dtypes)}")
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(dict(_class_name="SD3Transformer2DModel", **dataclasses.asdict(cfg)), f, indent=2)
    with open(os.path.join(folder, META), "w") as f:  # written last: its presence marks a complete folder
        json.dump({"dtype": dtypes.pop(), "source": "swd_jax.demo.teacher (flow matching on digits)",
                   "num_params": n, **(info or {})}, f, indent=2)


def teacher_exists(folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, n)) for n in (CONFIG, META, PARAMS))
