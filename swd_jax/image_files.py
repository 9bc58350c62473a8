"""Image files: a grid of images as one array, and a PNG writer that keeps tiny images visible."""
from __future__ import annotations

import os

import numpy as np


def image_grid(images_NHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, C] floats in [-1, 1] (or uint8) -> one uint8 [rows*H, cols*W, 3] grid (1 channel as grey)."""
    x = np.asarray(images_NHWC)
    if x.dtype != np.uint8:
        x = np.clip((x.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
    n, h, w, _ = x.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    return grid


def save_png(path: str, grid_HW3: np.ndarray, min_size: int = 256):
    """Write a grid as PNG, upscaled (nearest) so that tiny images stay visible."""
    from PIL import Image
    img = Image.fromarray(grid_HW3)
    if max(img.size) < min_size:
        f = int(np.ceil(min_size / max(img.size)))
        img = img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
