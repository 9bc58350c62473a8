"""Scale-wise sampling (METHOD.md s.3; reference `FlowMatchingSolver.sampling` with do_scales=True) and Euler.

A velocity function has the signature `velocity_fn(params, x_BHWC, timestep_B, cond) -> v_BHWC`, where
`cond` is any pytree whose leaves have the batch on axis 0 and timestep = 1000 * sigma (float32).

Scale-wise step i = 0..K-1 at latent size scales[i]:
    v = G(x, t_i);  x0 = x - sigma_i * v;  if i < K-1:  x = sigma_{i+1} eps_i + (1 - sigma_{i+1}) up(x0)
with up = torch-exact bicubic to scales[i+1] (skipped when the size does not change). The final x0 is
returned. A full-resolution few-step x0-renoise sampler is this with all scales equal.

Compilation: each step is one jitted program whose static shape is its scale (plus the next scale), cached
across calls; pass the SAME `velocity_fn` object every call (it is a static argument, hashed by identity).
Classifier-free guidance (teacher sampling): when guidance_scale > 1 (the reference's condition), cond and
`uncond` run as one doubled batch, v = v_u + g (v_c - v_u). The distilled student uses guidance 1.
PRNG: initial noise = normal(fold_in(key, 0)), renoise noise of step i = normal(fold_in(key, i + 1)); or
give the noise explicitly as a `SamplerNoise` (e.g. to feed identical noise to a torch loop).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.method.resize import bicubic_resize
from swd_jax.method.schedule import NUM_TRAIN_TIMESTEPS, ScaleSchedule

VelocityFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def mmdit_velocity(model) -> VelocityFn:
    """The velocity function of an MMDiT module: params = its "params" collection, cond = {context, pooled}.

    Make it once per model and reuse the object: the sampler compiles per velocity function.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.sampler import mmdit_velocity
    >>> class Toy:   # anything with MMDiT's apply(variables, x, t, context, pooled)
    ...     def apply(self, variables, x, t, context, pooled): return variables["params"]["w"] * x
    >>> v = mmdit_velocity(Toy())
    >>> v({"w": 2.0}, jnp.ones((1, 2, 2, 4)), jnp.zeros(1), {"context": None, "pooled": None}).shape
    (1, 2, 2, 4)
    """
    def velocity(params, x_BHWC, t_B, cond):
        return model.apply({"params": params}, x_BHWC, t_B, cond["context"], cond["pooled"])

    return velocity


def flux_velocity(model) -> VelocityFn:
    """The velocity function of a FLUX module (`swd_jax.models.flux.Flux`).

    params = its variables, `{"params": base}` or with `"lora": student` for the distilled student; cond =
    {context, pooled} plus, for FLUX-dev, `guidance` [B] (the embedded guidance scale, e.g. 4.5 for FLUX-SwD).
    Make it once per model and reuse the object: the sampler compiles per velocity function.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.sampler import flux_velocity
    >>> class Toy:   # anything with Flux's apply(variables, x, t, context, pooled, guidance)
    ...     def apply(self, variables, x, t, context, pooled, guidance): return x * guidance[:, None, None, None]
    >>> v = flux_velocity(Toy())
    >>> cond = {"context": None, "pooled": None, "guidance": jnp.full((1,), 4.5)}
    >>> float(v({}, jnp.ones((1, 2, 2, 4)), jnp.zeros(1), cond).max())
    4.5
    """
    def velocity(params, x_BHWC, t_B, cond):
        return model.apply(params, x_BHWC, t_B, cond["context"], cond["pooled"], cond.get("guidance"))

    return velocity


@dataclasses.dataclass(frozen=True)
class SamplerNoise:
    """Explicit noise: `init_BHWC` at scales[0], and `steps[i]` [B, s_{i+1}, s_{i+1}, C] for i = 0..K-2.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.sampler import SamplerNoise
    >>> n = SamplerNoise(jnp.zeros((1, 2, 2, 16)), steps=(jnp.zeros((1, 4, 4, 16)),))   # scales (2, 4)
    >>> len(n.steps)
    1
    """

    init_BHWC: jnp.ndarray
    steps: tuple[jnp.ndarray, ...] = ()


def _velocity(velocity_fn, params, x_BHWC, t_B, cond, uncond, guidance_scale, guided: bool):
    """Velocity with optional CFG, cond and uncond batched in one forward: v_u + g (v_c - v_u)."""
    if not guided:
        return velocity_fn(params, x_BHWC, t_B, cond).astype(jnp.float32)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    v = velocity_fn(params, cat(x_BHWC, x_BHWC), cat(t_B, t_B), jax.tree.map(cat, cond, uncond))
    v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2, axis=0)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@functools.partial(jax.jit, static_argnames=("velocity_fn", "guided"))
def _scale_step(velocity_fn, params, x_BHWC, t, sigma, sigma_next, eps_next_BHWC, cond, uncond,
                guidance_scale, *, guided: bool):
    """One scale-wise step; eps_next None marks the last step (returns x0). Shapes are static per scale."""
    t_B = jnp.full((x_BHWC.shape[0],), t, jnp.float32)
    v = _velocity(velocity_fn, params, x_BHWC, t_B, cond, uncond, guidance_scale, guided)
    x0 = x_BHWC - sigma * v
    if eps_next_BHWC is None:
        return x0
    x0 = bicubic_resize(x0, eps_next_BHWC.shape[1:3])  # identity when the size is unchanged
    return sigma_next * eps_next_BHWC + (1.0 - sigma_next) * x0


@functools.partial(jax.jit, static_argnames=("velocity_fn", "guided"))
def _euler_step(velocity_fn, params, x_BHWC, t, sigma, sigma_next, cond, uncond, guidance_scale, *,
                guided: bool):
    """One flow-matching Euler step x + (sigma_next - sigma) v."""
    t_B = jnp.full((x_BHWC.shape[0],), t, jnp.float32)
    v = _velocity(velocity_fn, params, x_BHWC, t_B, cond, uncond, guidance_scale, guided)
    return x_BHWC + (sigma_next - sigma) * v


def _resolve_schedule(schedule) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    if isinstance(schedule, ScaleSchedule):
        return schedule.scales, schedule.sampling_sigmas, schedule.sampling_timesteps
    try:
        scales, sigmas = schedule
    except (TypeError, ValueError):
        raise ValueError("schedule must be a ScaleSchedule or a (scales, sigmas) pair") from None
    scales = tuple(int(s) for s in scales)
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.shape != (len(scales) + 1,):
        raise ValueError(f"need len(sigmas) == len(scales) + 1 = {len(scales) + 1}, got {sigmas.shape}")
    if any(b < a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be non-decreasing, got {scales}")
    return scales, sigmas, sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)


def _guided(guidance_scale: float, uncond) -> bool:
    if guidance_scale > 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs `uncond`")
    return guidance_scale > 1.0


def scale_wise_sample(velocity_fn: VelocityFn, params, cond, key: jax.Array | None,
                      schedule: ScaleSchedule | tuple[Sequence[int], Sequence[float]], *,
                      batch_size: int, channels: int = 16, uncond=None, guidance_scale: float = 1.0,
                      noise: SamplerNoise | None = None) -> jnp.ndarray:
    """Scale-wise sampler: K steps, x0-prediction, bicubic upscale and re-noise between scales -> x0_BHWC.

    `schedule` is a ScaleSchedule (sampling_sigmas / sampling_timesteps) or a (scales, sigmas) pair with
    len(sigmas) = K + 1 and timesteps float32(sigma) * 1000. Give `key` or `noise` (noise wins).
    Returns float32 [batch_size, scales[-1], scales[-1], channels]. With all scales equal and each re-noise
    draw equal to the implied noise x0 + v, this is `euler_sample` on the same sigmas (see the example).

    >>> import jax, jax.numpy as jnp
    >>> from swd_jax.method.sampler import SamplerNoise, scale_wise_sample
    >>> def velocity(params, x, t, cond): return params * x           # a toy linear "model"
    >>> noise = SamplerNoise(jnp.ones((1, 2, 2, 1)), steps=(jnp.ones((1, 4, 4, 1)),))
    >>> x0 = scale_wise_sample(velocity, 0.5, None, None, ((2, 4), (1.0, 0.5, 0.0)), batch_size=1,
    ...                        channels=1, noise=noise)
    >>> x0.shape, x0.dtype, float(x0.min()), float(x0.max())   # x0 = 1 - 0.5 = 0.5, 0.5 + 0.5 * 0.5, 0.75 - 0.5 * 0.375
    ((1, 4, 4, 1), dtype('float32'), 0.5625, 0.5625)
    >>> scale_wise_sample(velocity, 0.5, None, jax.random.key(0), ((2, 4), (1.0, 0.5, 0.0)), batch_size=3).shape
    (3, 4, 4, 16)
    """
    scales, sigmas, timesteps = _resolve_schedule(schedule)
    guided = _guided(guidance_scale, uncond)
    k = len(scales)
    shapes = [(batch_size, s, s, channels) for s in scales]
    if noise is None:
        if key is None:
            raise ValueError("give a PRNG `key` or explicit `noise`")
        draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shapes[i], jnp.float32)
        init, steps = draw(0), [draw(i + 1) for i in range(k - 1)]
    else:
        init, steps = noise.init_BHWC, list(noise.steps)
        got = [tuple(init.shape)] + [tuple(e.shape) for e in steps]
        if got != [tuple(s) for s in shapes]:
            raise ValueError(f"noise shapes {got} do not match the schedule's {shapes}")
    x = jnp.asarray(init, jnp.float32)
    for i in range(k):
        eps_next = jnp.asarray(steps[i], jnp.float32) if i < k - 1 else None
        sigma_next = sigmas[i + 1]
        x = _scale_step(velocity_fn, params, x, timesteps[i], sigmas[i], sigma_next, eps_next, cond, uncond,
                        jnp.float32(guidance_scale), guided=guided)
    return x


def euler_sample(velocity_fn: VelocityFn, params, x_init_BHWC: jnp.ndarray, sigmas: Sequence[float], cond, *,
                 timesteps: Sequence[float] | None = None, uncond=None,
                 guidance_scale: float = 1.0) -> jnp.ndarray:
    """Plain flow-matching Euler at one resolution: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i).

    `sigmas` has N+1 values (e.g. `flow_match_sigmas(28, 3.0)` for the 28-step teacher), timesteps default
    to float32(sigmas[:-1]) * 1000. One compiled step serves all N steps. Returns x at sigmas[-1] (float32).

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.sampler import euler_sample
    >>> def velocity(params, x, t, cond): return params * x
    >>> x = euler_sample(velocity, 0.5, jnp.ones((1, 4, 4, 1)), [1.0, 0.5, 0.0], None)
    >>> float(x.min()), float(x.max())   # 1 - 0.5 * 0.5 = 0.75, then 0.75 - 0.5 * 0.375
    (0.5625, 0.5625)
    """
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 values, got shape {sigmas.shape}")
    timesteps = (sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS) if timesteps is None
                 else np.asarray(timesteps, np.float32))
    if timesteps.shape != (sigmas.shape[0] - 1,):
        raise ValueError(f"need len(timesteps) == len(sigmas) - 1, got {timesteps.shape} vs {sigmas.shape}")
    guided = _guided(guidance_scale, uncond)
    x = jnp.asarray(x_init_BHWC, jnp.float32)
    for i in range(sigmas.shape[0] - 1):
        x = _euler_step(velocity_fn, params, x, timesteps[i], sigmas[i], sigmas[i + 1], cond, uncond,
                        jnp.float32(guidance_scale), guided=guided)
    return x
