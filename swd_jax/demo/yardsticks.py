"""The digits demo's yardsticks: a digit classifier, prompt accuracy, Frechet distance, FLOPs and time per image.

Quality: an MLP classifier (scikit-learn, one hidden ReLU layer) trained in seconds on the real digits at the
demo's resolution. Prompt accuracy = share of generated images it labels as the prompted digit. The Frechet
distance FD = |mu_r - mu_g|^2 + tr(C_r + C_g - 2 (C_r C_g)^{1/2}) is computed between real and generated
images in its hidden-layer feature space (the FID recipe with a digit network instead of Inception).
Cost: FLOPs per image from XLA's cost analysis of the very programs the sampler runs (one per step, summed),
and measured wall time per image (compiled, batched, host clock).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax import sampler as sampler_lib
from swd_jax.schedule import NUM_TRAIN_TIMESTEPS
from swd_jax.demo.toy_data import load_digits_images


@dataclasses.dataclass
class DigitClassifier:
    """sklearn MLPClassifier on flattened [-1, 1] images; `features` = its hidden ReLU layer."""
    size: int
    hidden: int = 64
    seed: int = 0
    holdout: float = 0.2

    def __post_init__(self):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        x, y = load_digits_images(self.size)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=self.holdout, random_state=self.seed, stratify=y)
        self.real_train, self.real_test, self.labels_test = x_tr, x_te, y_te
        self.mlp = MLPClassifier((self.hidden,), max_iter=400, random_state=self.seed, alpha=1e-3)
        with warnings.catch_warnings():  # tiny CI-sized classifiers stop before convergence; that is fine
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp.fit(self._flat(x_tr), y_tr)
        self.test_accuracy = float((self.mlp.predict(self._flat(x_te)) == y_te).mean())

    def _flat(self, x_NHWC: np.ndarray) -> np.ndarray:
        x = np.asarray(x_NHWC, np.float32)
        if x.shape[1:] != (self.size, self.size, 1):
            raise ValueError(f"classifier takes [N, {self.size}, {self.size}, 1] images, got {x.shape}")
        return np.clip(x, -1.0, 1.0).reshape(len(x), -1)

    def predict(self, x_NHWC: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self._flat(x_NHWC))

    def features(self, x_NHWC: np.ndarray) -> np.ndarray:
        """Hidden-layer activations relu(x W1 + b1), [N, hidden], float64."""
        h = self._flat(x_NHWC).astype(np.float64) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(h, 0.0)


def frechet_distance(feat_a_NF: np.ndarray, feat_b_NF: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)) of two feature sets (rows are samples)."""
    from scipy import linalg
    if feat_a_NF.ndim != 2 or feat_a_NF.shape[1] != feat_b_NF.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with equal F, got {feat_a_NF.shape} and {feat_b_NF.shape}")
    mu_a, mu_b = feat_a_NF.mean(0), feat_b_NF.mean(0)
    c_a, c_b = np.cov(feat_a_NF, rowvar=False), np.cov(feat_b_NF, rowvar=False)
    with warnings.catch_warnings():  # singular products are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(c_a @ c_b)
    if not np.isfinite(covmean).all():  # the standard FID fix for near-singular products
        off = np.eye(len(c_a)) * 1e-6
        covmean = linalg.sqrtm((c_a + off) @ (c_b + off))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(c_a + c_b - 2.0 * np.real(covmean)))


def quality(clf: DigitClassifier, images_NHWC: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    """Prompt accuracy (%) and FD to the real digits in the classifier's feature space."""
    acc = float((clf.predict(images_NHWC) == np.asarray(labels_N)).mean())
    real = np.concatenate([clf.real_train, clf.real_test])
    return {"prompt_acc": 100.0 * acc, "fd": frechet_distance(clf.features(real), clf.features(images_NHWC))}


# ----------------------------------------------------------------------------------------------------------------
# cost: FLOPs of the sampler's compiled programs, wall time
# ----------------------------------------------------------------------------------------------------------------
def _flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA cost analysis gave no 'flops' for this program")
    return float(cost["flops"])


def scale_wise_flops(velocity_fn, params, cond, scales, sigmas, *, batch_size: int, channels: int,
                     uncond=None, guidance_scale: float = 1.0) -> float:
    """FLOPs per image of `scale_wise_sample`: its per-step programs (`sampler._scale_step`) lowered and summed."""
    sigmas = np.asarray(sigmas, np.float32)
    guided = guidance_scale > 1.0
    total = 0.0
    for i, s in enumerate(scales):
        x = jax.ShapeDtypeStruct((batch_size, s, s, channels), jnp.float32)
        eps = (jax.ShapeDtypeStruct((batch_size, scales[i + 1], scales[i + 1], channels), jnp.float32)
               if i + 1 < len(scales) else None)
        total += _flops(sampler_lib._scale_step.lower(
            velocity_fn, params, x, sigmas[i] * np.float32(NUM_TRAIN_TIMESTEPS), sigmas[i], sigmas[i + 1], eps,
            cond, uncond, jnp.float32(guidance_scale), guided=guided))
    return total / batch_size


def euler_flops(velocity_fn, params, cond, num_steps: int, size: int, *, batch_size: int, channels: int,
                uncond=None, guidance_scale: float = 1.0) -> float:
    """FLOPs per image of `euler_sample` with `num_steps` steps: one step program (`sampler._euler_step`) x steps."""
    x = jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32)
    one = _flops(sampler_lib._euler_step.lower(velocity_fn, params, x, np.float32(1000.0), np.float32(1.0),
                                               np.float32(0.5), cond, uncond, jnp.float32(guidance_scale),
                                               guided=guidance_scale > 1.0))
    return num_steps * one / batch_size


def timed(fn: Callable[..., jnp.ndarray], *args, **kwargs) -> tuple[np.ndarray, float]:
    """(fn(*args, **kwargs) as numpy, wall seconds of the call), waiting for the device."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return np.asarray(out), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def save_grid(images_NHWC: np.ndarray, path: str, columns: int = 10, zoom: int = 4) -> None:
    """PNG grid of [-1, 1] 1-channel images, row-major, each pixel repeated `zoom` times (ink white)."""
    from PIL import Image
    x = np.clip((np.asarray(images_NHWC)[..., 0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, s = x.shape[0], x.shape[1]
    rows = -(-n // columns)
    pad = 1
    grid = np.full((rows * (s + pad) + pad, columns * (s + pad) + pad), 64, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (s + pad):pad + r * (s + pad) + s, pad + c * (s + pad):pad + c * (s + pad) + s] = x[i]
    Image.fromarray(np.kron(grid, np.ones((zoom, zoom), np.uint8))).save(path)


COLUMNS = (("model", "{}"), ("steps", "{}"), ("latent sizes", "{}"), ("prompt acc. %", "{:.1f}"),
           ("FD", "{:.2f}"), ("FD to teacher", "{:.2f}"), ("MFLOPs / image", "{:.2f}"),
           ("FLOPs vs full-res 4-step", "{:.2f}"), ("ms / image", "{:.2f}"))


def markdown_table(rows: list[dict]) -> str:
    """Rows of {model, steps, latent sizes, prompt acc. %, FD, MFLOPs / image, ...} as a markdown table."""
    names = [c for c, _ in COLUMNS]
    out = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for name, fmt in COLUMNS:
            v = r.get(name)
            cells.append("-" if v is None else fmt.format(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
