"""FID as the official code computes it (pytorch-fid's `calculate_frechet_distance` on pool3 statistics).

`FIDScorer` turns images into Inception features in jitted fixed-size batches (the official image chain of
`image_chain.fid_input`, then `FIDInceptionV3`); `feature_stats` gives (mu, sigma) as
`calculate_activation_statistics` (float64 mean, `np.cov(rowvar=False)`); `frechet_distance` is
pytorch-fid's function (scipy `sqrtm`, eps offset when singular, imaginary part checked). Reference statistics
come from an `.npz` with `mu` and `sigma` (the official `fid_stats_mscoco256_val.npz`,
`fid_stats_mjhq256_val.npz`) or from a folder of real images put through the same Resize(256) / CenterCrop
chain (without the generated-image resize to 512).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from PIL import Image
from scipy import linalg

from swd_jax.convert.inception import load_inception
from swd_jax.eval import image_chain

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's


def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64, as pytorch-fid's `calculate_activation_statistics`."""
    f = np.asarray(features_ND, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors [N, D], got shape {f.shape}")
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): pytorch-fid's `calculate_frechet_distance`."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID: statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # = pytorch-fid's `sqrtm(..., disp=False)[0]`
    if not np.isfinite(covmean).all():  # product close to singular: regularise as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an `.npz` holding `mu` and `sigma` (pytorch-fid's format)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics {path} not found")
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: FID statistics need arrays 'mu' and 'sigma', found {f.files}")
        return f["mu"][:], f["sigma"][:]


def image_files(folder: str) -> list[str]:
    """The images of a folder (pytorch-fid's extensions, not recursive), sorted; none raises."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


class FIDScorer:
    """pytorch-fid's Inception on the official chain: `features(images)` -> [N, 2048] float64, in jitted
    batches of `batch_size` (the last one padded, so one program serves every batch)."""

    def __init__(self, inception_path: str, batch_size: int = 50):
        self.model, params = load_inception(inception_path)
        self.params = jax.device_put(params)
        self.batch_size = batch_size
        self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

    def features_of_inputs(self, inputs: Iterable[np.ndarray], progress: Callable | None = None) -> np.ndarray:
        """Features of already preprocessed [256, 256, 3] float inputs (`image_chain.fid_input`)."""
        out, batch = [], []

        def flush():
            x = np.stack(batch)
            n = len(x)
            if n < self.batch_size:
                x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], x.dtype)])
            out.append(np.asarray(self._apply(self.params, x), np.float64)[:n])
            if progress is not None:
                progress(n)
            batch.clear()

        for x in inputs:
            batch.append(x)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        if not out:
            raise ValueError("FID: no images")
        return np.concatenate(out)

    def features(self, images: Sequence, generated: bool = True, progress: Callable | None = None) -> np.ndarray:
        """Features of uint8 [H, W, 3] images (or PIL images): generated ones go through the official 512 px
        resize first, real ones (`generated=False`) straight to the 256 px Lanczos + crop."""
        first = image_chain.official_512 if generated else image_chain.to_pil
        return self.features_of_inputs((image_chain.fid_input(first(im)) for im in images), progress)

    def folder_stats(self, folder: str, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a folder of real images."""
        def load(path):
            with Image.open(path) as im:
                return im.convert("RGB")
        files = image_files(folder)
        return feature_stats(self.features((load(f) for f in files), generated=False, progress=progress))

    def reference_stats(self, source: str, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) from an `.npz` or a folder of real images."""
        return load_stats(source) if source.endswith(".npz") else self.folder_stats(source, progress)
