"""Flow-matching sigma grid (diffusers-exact) and the SwD scale/boundary schedule (METHOD.md sections 1-2).

The grid reproduces `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)` bit for bit:
the scheduler's sigma_min comes from its float32 training table, the inference sigmas are computed in
float64 and cast to float32, timesteps are `float32(sigma) * 1000` in float32, and a final sigma 0 is appended.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def _train_sigma_min(shift: float) -> float:
    """Shifted sigma of the smallest training timestep (t=1), computed in float32 like diffusers' __init__."""
    s = np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS)
    return float(np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s))


def _train_sigma_max(shift: float) -> float:
    """Shifted sigma of the largest training timestep (t=1000) in float32: 1.0 for any shift."""
    s = np.float32(1.0)
    return float(np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s))


@functools.lru_cache(maxsize=None)
def _grid(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = np.linspace(_train_sigma_max(shift) * NUM_TRAIN_TIMESTEPS,
                    _train_sigma_min(shift) * NUM_TRAIN_TIMESTEPS, num_steps)
    s = t / NUM_TRAIN_TIMESTEPS
    s = (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)
    timesteps = s * np.float32(NUM_TRAIN_TIMESTEPS)
    sigmas = np.concatenate([s, np.zeros(1, np.float32)])
    sigmas.setflags(write=False)
    timesteps.setflags(write=False)
    return sigmas, timesteps


def flow_match_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """Shifted flow-matching sigmas s' = shift*s / (1 + (shift-1)*s), num_steps+1 float32 values, last 0.

    Strictly decreasing from 1.0 (a float32 ulp or two less for some non-integer shifts, as diffusers)
    to 0; a read-only array (cached per (num_steps, shift)).

    >>> import numpy as np
    >>> from swd_jax.method.schedule import flow_match_sigmas
    >>> s = flow_match_sigmas(28, 3.0)
    >>> s.shape, s.dtype
    ((29,), dtype('float32'))
    >>> np.round(s[[0, 7, 14, 18, 27, 28]].astype(float), 4).tolist()   # SD3.5-M 4-step boundaries, last two
    [1.0, 0.8959, 0.7371, 0.6022, 0.0089, 0.0]
    """
    return _grid(num_steps, float(shift))[0]


def flow_match_timesteps(num_steps: int, shift: float) -> np.ndarray:
    """Model timesteps 1000 * sigma[:-1] (float32), as diffusers' `scheduler.timesteps`.

    >>> import numpy as np
    >>> from swd_jax.method.schedule import flow_match_timesteps
    >>> np.round(flow_match_timesteps(4, 1.0), 1).tolist()   # shift 1: linspace(1000, 1, 4)
    [1000.0, 667.0, 334.0, 1.0]
    """
    return _grid(num_steps, float(shift))[1]


# FLUX.1-dev's scheduler/scheduler_config.json (the fields FluxPipeline's sigmas depend on): the fallback when a
# pipeline folder has no scheduler config.
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
# FlowMatchEulerDiscreteScheduler's own defaults (diffusers' __init__), for the fields a config file leaves out; then
# the fields this sigma grid does not implement (set to anything true, they raise).
FLOW_MATCH_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                                 "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                                 "max_shift": 1.15}
_UNSUPPORTED_SCHEDULER = ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                         "use_beta_sigmas", "stochastic_sampling", "use_flow_sigmas")  # only unset / false


def flux_dynamic_sigmas(steps: int, image_seq_len: int, scheduler: dict = FLUX_DEV_SCHEDULER) -> np.ndarray:
    """FluxPipeline's sigmas, diffusers-exact: linspace(1, 1/steps, steps) in float32, time-shifted by
    exp(mu) / (exp(mu) + (1/s - 1)) with mu = calculate_shift(image_seq_len, ...) (use_dynamic_shifting) or by the
    static `shift` (FLUX-schnell: 1), then a final 0; steps+1 float32 values. `image_seq_len` = packed tokens,
    (latent_h / 2) * (latent_w / 2); `scheduler` = a FlowMatchEulerDiscreteScheduler config (missing fields: its
    defaults).

    >>> import numpy as np
    >>> from swd_jax.method.schedule import flux_dynamic_sigmas
    >>> np.round(flux_dynamic_sigmas(4, image_seq_len=4096).astype(float), 4).tolist()   # 1024 px FLUX-dev
    [1.0, 0.9045, 0.7595, 0.5128, 0.0]
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    c = {**FLOW_MATCH_SCHEDULER_DEFAULTS, **scheduler}
    for field in _UNSUPPORTED_SCHEDULER:
        if c.get(field):
            raise ValueError(f"scheduler config {field}={c[field]!r} is not supported (only unset or false)")
    if c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"scheduler config time_shift_type={c['time_shift_type']!r} is not supported "
                         "(only 'exponential')")
    if c["num_train_timesteps"] != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"scheduler config num_train_timesteps={c['num_train_timesteps']} is not supported "
                         f"(only {NUM_TRAIN_TIMESTEPS})")
    # The same numpy expressions as FluxPipeline.__call__ and FlowMatchEulerDiscreteScheduler.set_timesteps.
    s = np.array(np.linspace(1.0, 1 / steps, steps)).astype(np.float32)
    if c["use_dynamic_shifting"]:
        m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = image_seq_len * m + (c["base_shift"] - m * c["base_image_seq_len"])  # calculate_shift
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = c["shift"] * s / (1 + (c["shift"] - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def add_noise(x0: jnp.ndarray, eps: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
    """Flow-matching forward process x_sigma = sigma * eps + (1 - sigma) * x0, sigma a scalar or per example [B].

    sigma is cast to x0's dtype; the result has the promoted dtype of x0 and eps.

    >>> import jax.numpy as jnp
    >>> from swd_jax.method.schedule import add_noise
    >>> x0, eps = jnp.zeros((2, 1, 1, 1)), jnp.ones((2, 1, 1, 1))
    >>> add_noise(x0, eps, jnp.array([0.25, 1.0])).ravel().tolist()
    [0.25, 1.0]
    """
    sigma = jnp.asarray(sigma, dtype=x0.dtype)
    if sigma.ndim == 1:
        if sigma.shape[0] != x0.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} values but the batch is {x0.shape[0]}")
        sigma = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    elif sigma.ndim != 0:
        raise ValueError(f"sigma must be a scalar or [B], got shape {sigma.shape}")
    return sigma * eps + (1.0 - sigma) * x0


@dataclasses.dataclass(frozen=True)
class ScaleSchedule:
    """K latent sizes (`scales`) and K+1 boundary indices into the `num_train_steps` flow-matching grid.

    Interval k runs from grid index boundaries[k] to boundaries[k+1] at latent size scales[k]. A schedule
    may instead give `explicit_sigmas` (K+1 sampling sigmas ending in 0, e.g. FLUX, whose table has no
    boundaries); such a schedule can sample but has no training grid indices (those methods raise).

    >>> import numpy as np
    >>> from swd_jax.method.schedule import ScaleSchedule, get_schedule
    >>> sch = get_schedule("sd35_medium_4")
    >>> sch.scales, sch.boundaries
    ((64, 80, 96, 128), (0, 7, 14, 18, 28))
    >>> np.round(sch.sampling_sigmas.astype(float), 4).tolist()
    [1.0, 0.8959, 0.7371, 0.6022, 0.0]
    >>> k = sch.interval(step=5); (k, sch.start_index(k), sch.scale(k), sch.prev_scale(k))
    (1, 7, 80, 64)
    >>> bool(np.all(sch.boundary_sigmas == sch.sigmas[list(sch.boundaries)]))
    True
    >>> ScaleSchedule(scales=(32, 64), explicit_sigmas=(1.0, 0.5, 0.0)).sampling_timesteps.tolist()
    [1000.0, 500.0]
    """

    scales: tuple[int, ...]
    boundaries: tuple[int, ...] | None = None
    num_train_steps: int = 28
    shift: float = 3.0
    patch_size: int = 2
    explicit_sigmas: tuple[float, ...] | None = None

    def __post_init__(self):
        scales, k = tuple(self.scales), len(self.scales)
        object.__setattr__(self, "scales", scales)
        if k == 0:
            raise ValueError("scales must not be empty")
        if any(not isinstance(s, (int, np.integer)) or s <= 0 for s in scales):
            raise ValueError(f"scales must be positive ints, got {scales}")
        scales = tuple(int(s) for s in scales)
        object.__setattr__(self, "scales", scales)
        if any(b < a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be non-decreasing (equal neighbours skip the resize), got {scales}")
        if any(s % self.patch_size for s in scales):
            raise ValueError(f"every scale must be divisible by patch_size={self.patch_size}, got {scales}")
        if (self.boundaries is None) == (self.explicit_sigmas is None):
            raise ValueError("give exactly one of `boundaries` (grid indices) or `explicit_sigmas`")
        if self.boundaries is not None:
            b = tuple(int(i) for i in self.boundaries)
            object.__setattr__(self, "boundaries", b)
            if len(b) != k + 1:
                raise ValueError(f"need len(boundaries) == len(scales) + 1 = {k + 1}, got {len(b)}: {b}")
            if b[0] != 0:
                raise ValueError(f"boundaries must start at 0, got {b}")
            if b[-1] != self.num_train_steps:
                raise ValueError(f"boundaries must end at num_train_steps={self.num_train_steps}, got {b}")
            if any(i < 0 or i > self.num_train_steps for i in b):
                raise ValueError(f"boundaries must lie in [0, {self.num_train_steps}], got {b}")
            if any(j <= i for i, j in zip(b, b[1:])):
                raise ValueError(f"boundaries must be strictly increasing, got {b}")
        else:
            s = tuple(float(v) for v in self.explicit_sigmas)
            object.__setattr__(self, "explicit_sigmas", s)
            if len(s) != k + 1:
                raise ValueError(f"need len(explicit_sigmas) == len(scales) + 1 = {k + 1}, got {len(s)}: {s}")
            if s[-1] != 0.0 or any(not 0.0 <= v <= 1.0 for v in s):
                raise ValueError(f"explicit_sigmas must lie in [0, 1] and end at 0, got {s}")
            if any(j >= i for i, j in zip(s, s[1:])):
                raise ValueError(f"explicit_sigmas must be strictly decreasing, got {s}")

    @property
    def num_intervals(self) -> int:
        """K, the number of scales (= sampling steps)."""
        return len(self.scales)

    def _need_boundaries(self, what: str) -> tuple[int, ...]:
        if self.boundaries is None:
            raise ValueError(f"{what} needs grid boundaries; this schedule only has explicit_sigmas")
        return self.boundaries

    @property
    def sigmas(self) -> np.ndarray:
        """The full training grid, num_train_steps + 1 float32 sigmas (diffusers-exact), last 0."""
        return flow_match_sigmas(self.num_train_steps, self.shift)

    @property
    def timesteps(self) -> np.ndarray:
        """The full training grid of model timesteps, 1000 * sigmas[:-1] (float32)."""
        return flow_match_timesteps(self.num_train_steps, self.shift)

    @property
    def boundary_sigmas(self) -> np.ndarray:
        """The K+1 grid sigmas at the boundaries; the last is sigmas[num_train_steps] = 0."""
        return self.sigmas[np.asarray(self._need_boundaries("boundary_sigmas"))]

    @property
    def boundary_timesteps(self) -> np.ndarray:
        """The K model timesteps at the interval starts, timesteps[boundaries[:-1]] (float32)."""
        return self.timesteps[np.asarray(self._need_boundaries("boundary_timesteps")[:-1])]

    @property
    def sampling_sigmas(self) -> np.ndarray:
        """K+1 sigmas used by the scale-wise sampler: sigma at each interval start, then 0 (float32)."""
        if self.explicit_sigmas is not None:
            return np.asarray(self.explicit_sigmas, np.float32)
        return self.boundary_sigmas

    @property
    def sampling_timesteps(self) -> np.ndarray:
        """K model timesteps for sampling: boundary_timesteps, or float32(explicit sigma) * 1000."""
        if self.explicit_sigmas is not None:
            return self.sampling_sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)
        return self.boundary_timesteps

    def interval(self, step: int) -> int:
        """Interval k = step mod K trained at optimiser step `step` (the same for the whole batch)."""
        return int(step) % self.num_intervals

    def _check_k(self, k: int) -> int:
        if not 0 <= k < self.num_intervals:
            raise ValueError(f"interval k={k} out of range [0, {self.num_intervals})")
        return k

    def start_index(self, k: int) -> int:
        """Grid index b_k where interval k starts."""
        return self._need_boundaries("start_index")[self._check_k(k)]

    def end_index(self, k: int) -> int:
        """Grid index b_{k+1} where interval k ends."""
        return self._need_boundaries("end_index")[self._check_k(k) + 1]

    def scale(self, k: int) -> int:
        """Latent size s_k of interval k."""
        return self.scales[self._check_k(k)]

    def prev_scale(self, k: int) -> int:
        """Latent size s_{k-1} of the previous interval; s_0 itself for k = 0."""
        return self.scales[max(self._check_k(k) - 1, 0)]


PRESETS: dict[str, ScaleSchedule] = {
    "sd35_medium_4": ScaleSchedule(scales=(64, 80, 96, 128), boundaries=(0, 7, 14, 18, 28)),
    "sd35_medium_6": ScaleSchedule(scales=(32, 48, 64, 80, 96, 128), boundaries=(0, 4, 7, 12, 14, 18, 28)),
    "sd35_large_4": ScaleSchedule(scales=(64, 80, 96, 128), boundaries=(0, 7, 14, 18, 28)),
    # FLUX: the reference gives only sampling sigmas (README), no boundaries on the SD3 grid.
    "flux_4": ScaleSchedule(scales=(64, 80, 96, 128), explicit_sigmas=(1.0, 0.8956, 0.7363, 0.6007, 0.0)),
}


def get_schedule(name: str) -> ScaleSchedule:
    """The preset schedule `name` (one of PRESETS); an unknown name raises ValueError.

    >>> from swd_jax.method.schedule import get_schedule
    >>> get_schedule("flux_4").explicit_sigmas
    (1.0, 0.8956, 0.7363, 0.6007, 0.0)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def make_schedule(c) -> ScaleSchedule:
    """A run config's schedule (`c.schedule`: a `preset`, or `scales` + `boundaries` + `num_train_steps` + `shift`;
    configs/common.py)."""
    s = c.schedule
    if s.preset:
        if s.scales or s.boundaries:
            raise ValueError("schedule: give either `preset` or `scales`+`boundaries`, not both")
        return get_schedule(s.preset)
    return ScaleSchedule(scales=tuple(s.scales), boundaries=tuple(s.boundaries),
                         num_train_steps=s.num_train_steps, shift=s.shift)
