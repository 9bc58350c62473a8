"""The SwD training iteration as pure functions (METHOD.md s.4-5; reference yandex-research/swd `src/losses.py`).

One iteration = `n_fake_steps` fake-model updates, each on a fresh batch, then one generator update on another
fresh batch, all at the same scale interval k (the reference picks k from the global step, constant within an
iteration). `make_iteration(k)` returns ONE function `(state, base, batches, uncond) -> (state, metrics)` that
does all of it: jit it once per interval and the whole iteration is one compiled program.

As the official `train.py`: the fake updates run only when the DMD loss is on (`fake_steps`). With DMD off (a
PDM-only run, as the published SDXL-SwD student) the state holds no fake model, head or fake optimiser: the
fake model is the frozen teacher (the official fake LoRA keeps B = 0) and its features serve PDM; the GAN loss
needs the fake updates that train its head, so `do_gan` requires `do_dmd` (the official code fails there).
Batches carrying posterior stds get their latents drawn first, from the iteration's key (`draw_latents`).

Where ours differs from the official code on purpose (each a named option, README table of differences):
- PDM over several `mmd_blocks`: ours averages the PDM of every listed block; the official `generator_loss`
  takes only the first (`transformer_fake(...)[0]`). Equal for one block (every shipped config).
- The GAN-D term of the fake loss follows `gan_d_weight` alone, as the official code (which adds it even with
  `do_gan_loss` off); `gan_d_weight=0` drops it (and the real-feature pass).

Backbones (`swd_jax.models.backbone`): MMDiT (SD3/SD3.5) or FLUX. FLUX-dev is guidance-distilled: every pass
takes a guidance scale through its embedding (`SwDModels.guidance` for the student and fake model), and the
DMD teacher is ONE pass at `loss.guidance_teacher`, no doubled CFG batch (`uncond` is unused then).

Work done once where the reference does it twice:
- the teacher's conditional and unconditional passes are one forward on a 2B batch;
- the fake model's pass on the DMD-noised sample gives both its x0 (for DMD, gradient stopped) and the
  discriminator features (for the generator's GAN loss, gradient to the student through the input);
- real-image features stop at the feature block (`features_only`), and carry no gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from swd_jax.method import losses
from swd_jax.method.discriminator import DiscriminatorHead
from swd_jax.method.resize import bicubic_resize
from swd_jax.method.schedule import ScaleSchedule, add_noise
from swd_jax.models.flux import Flux
from swd_jax.models.mmdit import MMDiT

Batch = dict[str, jnp.ndarray]  # x [B,s,s,C] (target at s_k), x_prev [B,s',s',C] (at s_{k-1}), context, pooled


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and noise ranges of one SwD run (reference defaults for SD3.5-Medium)."""
    n_fake_steps: int = 5  # fake updates per generator update, run only with do_dmd (as the official train.py)
    dmd_weight: float = 1.0
    gan_g_weight: float = 5e-3
    gan_d_weight: float = 1e-2
    pdm_weight: float = 1.0
    cfg_teacher: float = 7.0
    guidance_teacher: float = 4.5  # FLUX-dev's teacher: the embedded guidance scale (cfg_teacher must be 1)
    cls_blocks: tuple[int, ...] = (11,)
    mmd_blocks: tuple[int, ...] = (11,)
    dmd_range: tuple[int, int] = (12, 28)
    pdm_range: tuple[int, int] = (18, 28)
    pdm_kernel: str = "linear"
    pdm_per_sample: bool = True
    huber_c: float = 1e-3
    rbf_bandwidth: float = 100.0
    do_dmd: bool = True
    do_gan: bool = True
    do_pdm: bool = True


@dataclasses.dataclass(frozen=True)
class SwDModels:
    """The one transformer module (teacher/student/fake by the `lora` pytree), the head, schedule and losses.

    `transformer` is the module of any backbone (MMDiT or Flux). `guidance`:
    FLUX-dev's guidance-embedding input of the student and fake passes (None for models without one).
    """
    transformer: MMDiT | Flux
    head: DiscriminatorHead
    schedule: ScaleSchedule
    loss: LossConfig
    opt_student: optax.GradientTransformation
    opt_fake: optax.GradientTransformation
    guidance: float | None = None

    def velocity(self, base, lora, x_BHWC, sigma_B, context, pooled, feature_blocks=(), features_only=False,
                 guidance: float | None = None):
        """The transformer at sigma (timestep 1000 sigma); `guidance` overrides `self.guidance` (the teacher)."""
        variables = {"params": base} if lora is None else {"params": base, "lora": lora}
        extra = {}
        if self.guidance is not None:
            g = self.guidance if guidance is None else guidance
            extra["guidance_B"] = jnp.full(sigma_B.shape, g, jnp.float32)
        return self.transformer.apply(variables, x_BHWC, 1000.0 * sigma_B, context, pooled,
                                feature_blocks=tuple(feature_blocks), features_only=features_only, **extra)


def _sigma(schedule: ScaleSchedule, idx_B) -> jnp.ndarray:
    return jnp.asarray(schedule.sigmas)[idx_B]


def _bcast(s_B, x):
    return s_B.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def fake_steps(loss: LossConfig) -> int:
    """Fake-model updates per iteration: `n_fake_steps` with DMD on, none with DMD off (official train.py)."""
    return loss.n_fake_steps if loss.do_dmd else 0


def batches_per_iteration(loss: LossConfig) -> int:
    """Fresh batches one iteration consumes: one per fake update, one for the generator."""
    return fake_steps(loss) + 1


def draw_latents(batches: Batch, key) -> Batch:
    """Posterior samples `x + x_std * eps` (and x_prev likewise, independently) where the batch carries stds.

    The official code draws `vae.encode(...).latent_dist.sample()` every time an image is used; the sources
    give the normalised posterior mean and std, so this is the same draw, made with the step's key.
    """
    out = {name: v for name, v in batches.items() if not name.endswith("_std")}
    for name, k in zip(("x", "x_prev"), jax.random.split(key)):
        if f"{name}_std" in batches:
            eps = jax.random.normal(k, batches[name].shape, jnp.float32)
            out[name] = (batches[name].astype(jnp.float32) + batches[f"{name}_std"].astype(jnp.float32) * eps
                         ).astype(batches[name].dtype)
    return out


def student_sample(m: SwDModels, base, student_lora, batch: Batch, k: int, key) -> jnp.ndarray:
    """x_fake = x_in - sigma_b * G(x_in): x_in = the previous-scale latent upscaled to s_k, noised to sigma[b_k]."""
    s_k = m.schedule.scale(k)
    x_prev = batch["x_prev"]
    x_up = x_prev if x_prev.shape[1] == s_k else bicubic_resize(x_prev, s_k)
    B = x_up.shape[0]
    sigma_B = jnp.full((B,), m.schedule.sigmas[m.schedule.start_index(k)], jnp.float32)
    eps = jax.random.normal(key, x_up.shape, x_up.dtype)
    x_in = add_noise(x_up, eps, sigma_B)
    v = m.velocity(base, student_lora, x_in, sigma_B, batch["context"], batch["pooled"])
    return x_in - _bcast(sigma_B, x_in) * v.astype(x_in.dtype)


def fake_loss(m: SwDModels, trainable, base, student_lora, batch: Batch, k: int, key):
    """MSE(x0_F(noised x_fake), x_fake) + w * GAN_D(D(feat_F(noised fake)), D(feat_F(noised real)))."""
    k_student, k_idx, k_eps = jax.random.split(key, 3)
    x_fake = jax.lax.stop_gradient(student_sample(m, base, student_lora, batch, k, k_student))
    B = x_fake.shape[0]
    idx = jax.random.randint(k_idx, (B,), 0, m.schedule.num_train_steps)
    sigma = _sigma(m.schedule, idx)
    eps = jax.random.normal(k_eps, x_fake.shape, x_fake.dtype)
    x_noisy = add_noise(x_fake, eps, sigma)
    v, feats_fake = m.velocity(base, trainable["lora"], x_noisy, sigma, batch["context"], batch["pooled"],
                               m.loss.cls_blocks)
    mse = losses.fake_model_loss(x_noisy - _bcast(sigma, x_noisy) * v.astype(x_noisy.dtype), x_fake)
    total, metrics = mse, {"fake/mse": mse}
    if m.loss.gan_d_weight != 0:  # official: added whatever do_gan_loss says
        real_noisy = add_noise(batch["x"], eps, sigma)
        feats_real = m.velocity(base, trainable["lora"], real_noisy, sigma, batch["context"], batch["pooled"],
                                m.loss.cls_blocks, features_only=True)
        gan_d = losses.gan_discriminator_loss(m.head.apply({"params": trainable["head"]}, list(feats_fake)),
                                              m.head.apply({"params": trainable["head"]}, list(feats_real)))
        total = total + m.loss.gan_d_weight * gan_d
        metrics["fake/gan_d"] = gan_d
    metrics["fake/loss"] = total
    return total, metrics


def generator_loss(m: SwDModels, student_lora, base, fake, batch: Batch, uncond: Batch, k: int, key):
    """w_dmd * DMD + w_gan * GAN_G + w_pdm * PDM, gradient w.r.t. the student LoRA only.

    `fake` None (DMD off): the fake model is the teacher (no LoRA). PDM averages over all `mmd_blocks` (the
    official code uses the first only).
    """
    cfg = m.loss
    fake_lora = None if fake is None else fake["lora"]
    k_student, k_dmd_idx, k_dmd_eps, k_pdm_idx, k_pdm_eps = jax.random.split(key, 5)
    x_fake = student_sample(m, base, student_lora, batch, k, k_student)
    B = x_fake.shape[0]
    ctx, pooled = batch["context"], batch["pooled"]
    total, metrics = jnp.zeros((), jnp.float32), {}
    if cfg.do_dmd or cfg.do_gan:
        idx = jax.random.randint(k_dmd_idx, (B,), *cfg.dmd_range)
        sigma = _sigma(m.schedule, idx)
        x_noisy = add_noise(x_fake, jax.random.normal(k_dmd_eps, x_fake.shape, x_fake.dtype), sigma)
        v_fake, feats = m.velocity(base, fake_lora, x_noisy, sigma, ctx, pooled, cfg.cls_blocks)
        if cfg.do_dmd:
            x_sg = jax.lax.stop_gradient(x_noisy)
            if m.guidance is not None:  # guidance-distilled teacher (FLUX-dev): the scale is an input
                v_teacher = m.velocity(base, None, x_sg, sigma, ctx, pooled,
                                       guidance=cfg.guidance_teacher).astype(jnp.float32)
            elif cfg.cfg_teacher > 1.0:  # one 2B forward: [cond; uncond]
                u_ctx = jnp.broadcast_to(uncond["context"], (B,) + uncond["context"].shape[1:]).astype(ctx.dtype)
                u_pooled = jnp.broadcast_to(uncond["pooled"], (B,) + uncond["pooled"].shape[1:]).astype(ctx.dtype)
                v2 = m.velocity(base, None, jnp.concatenate([x_sg, x_sg]), jnp.concatenate([sigma, sigma]),
                                jnp.concatenate([ctx, u_ctx]), jnp.concatenate([pooled, u_pooled]))
                v_cond, v_uncond = jnp.split(v2.astype(jnp.float32), 2)
                v_teacher = v_uncond + cfg.cfg_teacher * (v_cond - v_uncond)
            else:
                v_teacher = m.velocity(base, None, x_sg, sigma, ctx, pooled).astype(jnp.float32)
            s = _bcast(sigma, x_sg)
            x0_teacher = jax.lax.stop_gradient(x_sg - s * v_teacher)
            x0_fake = jax.lax.stop_gradient(x_sg - s * v_fake.astype(jnp.float32))
            dmd = losses.dmd_loss(x_fake, x0_teacher, x0_fake)
            total = total + cfg.dmd_weight * dmd
            metrics["gen/dmd"] = dmd
        if cfg.do_gan:
            gan_g = losses.gan_generator_loss(m.head.apply({"params": fake["head"]}, list(feats)))
            total = total + cfg.gan_g_weight * gan_g
            metrics["gen/gan_g"] = gan_g
    if cfg.do_pdm:
        idx = jax.random.randint(k_pdm_idx, (B,), *cfg.pdm_range)
        sigma = _sigma(m.schedule, idx)
        eps = jax.random.normal(k_pdm_eps, x_fake.shape, x_fake.dtype)
        f_fake = m.velocity(base, fake_lora, add_noise(x_fake, eps, sigma), sigma, ctx, pooled,
                            cfg.mmd_blocks, features_only=True)
        f_real = m.velocity(base, fake_lora, add_noise(batch["x"], eps, sigma), sigma, ctx, pooled,
                            cfg.mmd_blocks, features_only=True)
        pdm = sum(losses.pdm_loss(ff, jax.lax.stop_gradient(fr), kernel=cfg.pdm_kernel, per_sample=cfg.pdm_per_sample,
                                  c=cfg.huber_c, bandwidth=cfg.rbf_bandwidth)
                  for ff, fr in zip(f_fake, f_real)) / len(f_fake)
        total = total + cfg.pdm_weight * pdm
        metrics["gen/pdm"] = pdm
    metrics["gen/loss"] = total
    return total, metrics


def init_state(student_lora, fake_lora, head_params, m: SwDModels, key) -> dict[str, Any]:
    """The optimised train state: a plain dict pytree (the frozen base weights are NOT part of it).

    With DMD off there are no fake updates, so no fake LoRA, head or fake optimiser state (`fake_lora` and
    `head_params` are ignored; pass None).
    """
    state = {"student": student_lora, "opt_student": m.opt_student.init(student_lora),
             "step": jnp.zeros((), jnp.int32), "key": key}
    if m.loss.do_dmd:
        fake = {"lora": fake_lora, "head": head_params}
        state.update(fake=fake, opt_fake=m.opt_fake.init(fake))
    return state


def _apply(opt, grads, opt_state, params):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_iteration(m: SwDModels, k: int):
    """(state, base, batches[batches_per_iteration, ...], uncond) -> (state, metrics) for scale interval k."""
    n = fake_steps(m.loss)

    def iteration(state, base, batches: Batch, uncond: Batch):
        key = jax.random.fold_in(state["key"], state["step"])  # fake update i: fold_in(key, i); generator: n
        batches = draw_latents(batches, jax.random.fold_in(key, n + 1))
        gen_batch = jax.tree.map(lambda x: x[-1], batches)
        new_state, metrics = dict(state), {}

        def fake_update(carry, inputs):
            fake, opt_fake = carry
            batch, i = inputs
            grad_fn = jax.value_and_grad(fake_loss, argnums=1, has_aux=True)
            (_, metrics), grads = grad_fn(m, fake, base, state["student"], batch, k, jax.random.fold_in(key, i))
            metrics["fake/grad_norm"] = optax.tree.norm(grads)
            fake, opt_fake = _apply(m.opt_fake, grads, opt_fake, fake)
            return (fake, opt_fake), metrics

        if n:
            fake_batches = jax.tree.map(lambda x: x[:-1], batches)
            (new_state["fake"], new_state["opt_fake"]), fake_metrics = jax.lax.scan(
                fake_update, (state["fake"], state["opt_fake"]), (fake_batches, jnp.arange(n)))
            metrics.update({name: v[-1] for name, v in fake_metrics.items()})
            metrics["fake/loss_mean"] = fake_metrics["fake/loss"].mean()
        grad_fn = jax.value_and_grad(generator_loss, argnums=1, has_aux=True)
        (_, gen_metrics), grads = grad_fn(m, state["student"], base, new_state.get("fake"), gen_batch, uncond, k,
                                          jax.random.fold_in(key, n))
        metrics.update(gen_metrics)
        metrics["gen/grad_norm"] = optax.tree.norm(grads)
        new_state["student"], new_state["opt_student"] = _apply(m.opt_student, grads, state["opt_student"],
                                                                state["student"])
        new_state["step"] = state["step"] + 1
        return new_state, metrics

    return iteration
