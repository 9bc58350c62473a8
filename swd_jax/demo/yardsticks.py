"""The digits demo's yardsticks: a digit classifier, prompt accuracy, Frechet distance, FLOPs and time per image.

Quality: an MLP classifier (one hidden ReLU layer; our own seeded float64 NumPy, so no library's version moves
the numbers) trained in seconds on the real digits at the demo's resolution. Prompt accuracy = share of generated
images it labels as the prompted digit. The Frechet distance FD = |mu_r - mu_g|^2 + tr(C_r + C_g - 2 (C_r C_g)^{1/2})
is computed between real and generated images in its hidden-layer feature space (the FID recipe with a digit
network instead of Inception).
Cost: FLOPs per image from XLA's cost analysis of the very programs the sampler runs (one per step, summed),
and measured wall time per image (compiled, batched, host clock).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.demo.toy_data import load_digits_images
from swd_jax.method import sampler as sampler_lib
from swd_jax.method.schedule import NUM_TRAIN_TIMESTEPS


@dataclasses.dataclass
class DigitClassifier:
    """A one-hidden-layer ReLU MLP on flattened [-1, 1] images; `features` = its hidden layer.

    Ours in float64 NumPy, so its numbers depend on no library's version: a seeded stratified split, Glorot-uniform
    weights from `numpy.random.default_rng(seed)`, softmax cross-entropy + L2 (`alpha`), full-batch Adam.
    """
    size: int
    hidden: int = 64
    seed: int = 0
    holdout: float = 0.2
    steps: int = 300
    lr: float = 1e-2
    alpha: float = 1e-3

    def __post_init__(self):
        x, y = load_digits_images(self.size)
        test = stratified_holdout(y, self.holdout, self.seed)
        self.real_train, self.real_test, self.labels_test = x[~test], x[test], y[test]
        self.params = train_mlp(self._flat(x[~test]), y[~test], self.hidden, self.steps, self.lr, self.alpha,
                                self.seed)
        self.test_accuracy = float((self.predict(x[test]) == y[test]).mean())

    def _flat(self, x_NHWC: np.ndarray) -> np.ndarray:
        x = np.asarray(x_NHWC, np.float32)
        if x.shape[1:] != (self.size, self.size, 1):
            raise ValueError(f"classifier takes [N, {self.size}, {self.size}, 1] images, got {x.shape}")
        return np.clip(x, -1.0, 1.0).reshape(len(x), -1).astype(np.float64)

    def predict(self, x_NHWC: np.ndarray) -> np.ndarray:
        w2, b2 = self.params["w2"], self.params["b2"]
        return np.argmax(self.features(x_NHWC) @ w2 + b2, axis=1)

    def features(self, x_NHWC: np.ndarray) -> np.ndarray:
        """Hidden-layer activations relu(x W1 + b1), [N, hidden], float64."""
        return np.maximum(self._flat(x_NHWC) @ self.params["w1"] + self.params["b1"], 0.0)


def stratified_holdout(labels_N: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out `fraction` of every class (rounded), drawn by `default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels_N), bool)
    for c in np.unique(labels_N):
        idx = np.flatnonzero(labels_N == c)
        mask[rng.permutation(idx)[:int(round(fraction * len(idx)))]] = True
    return mask


def train_mlp(x_ND: np.ndarray, y_N: np.ndarray, hidden: int, steps: int, lr: float, alpha: float,
              seed: int) -> dict[str, np.ndarray]:
    """relu-MLP D -> hidden -> classes: full-batch Adam on mean softmax cross-entropy + alpha/2 |W|^2 / N."""
    rng = np.random.default_rng(seed)
    n, classes = len(x_ND), int(y_N.max()) + 1
    glorot = lambda a, b: rng.uniform(-1, 1, (a, b)) * np.sqrt(6.0 / (a + b))  # noqa: E731
    params = {"w1": glorot(x_ND.shape[1], hidden), "b1": np.zeros(hidden),
              "w2": glorot(hidden, classes), "b2": np.zeros(classes)}
    onehot = np.eye(classes)[y_N]
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        h = np.maximum(x_ND @ params["w1"] + params["b1"], 0.0)
        logits = h @ params["w2"] + params["b2"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        d_logits = (p / p.sum(1, keepdims=True) - onehot) / n
        d_h = (d_logits @ params["w2"].T) * (h > 0)
        grads = {"w2": h.T @ d_logits + alpha * params["w2"] / n, "b2": d_logits.sum(0),
                 "w1": x_ND.T @ d_h + alpha * params["w1"] / n, "b1": d_h.sum(0)}
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            params[k] = params[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    return params


def frechet_distance(feat_a_NF: np.ndarray, feat_b_NF: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)) of two feature sets (rows are samples).

    tr sqrtm(C_a C_b) = sum sqrt(eig(S C_b S)), S = C_a^{1/2}: symmetric eigensolves only (both are PSD), so
    singular covariances (dead ReLU units) need no offset and no scipy.
    """
    if feat_a_NF.ndim != 2 or feat_a_NF.shape[1] != feat_b_NF.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with equal F, got {feat_a_NF.shape} and {feat_b_NF.shape}")
    a, b = np.asarray(feat_a_NF, np.float64), np.asarray(feat_b_NF, np.float64)
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c_a)
    s = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    tr_covmean = np.sqrt(np.maximum(np.linalg.eigvalsh(s @ c_b @ s), 0.0)).sum()
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(c_a) + np.trace(c_b) - 2.0 * tr_covmean)


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
