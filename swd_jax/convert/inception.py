"""pytorch-fid's `pt_inception-2015-12-05-*.pth` (torchvision Inception3 state dict) -> FIDInceptionV3 params.

Accepted files, all holding the torch state-dict keys (`Mixed_5b.branch5x5_1.conv.weight`,
`....bn.running_var`, ...):
- `.pth`: read with `torch.load(weights_only=True)`; torch is imported only here, only for this format;
- `.safetensors` or `.npz`: read without torch. Convert once with
  `python -m swd_jax.convert.inception pt_inception-2015-12-05-6726825d.pth inception_fid.safetensors`
  to evaluate on a machine without torch.
Strict: every conv / batch-norm tensor must fill exactly one parameter with the right shape; the 1008-class
`fc` head (unused by FID) and `num_batches_tracked` counters are the only keys allowed to be skipped.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np

from swd_jax.convert.safetensors_reader import SafetensorsFile
from swd_jax.convert.strict import abstract_params, conv_to_kernel, convert_tensors, identity
from swd_jax.models.inception import FEATURE_DIM, FIDInceptionV3

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_FC_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}  # the TF graph's 1008-way classifier


class _ArrayDict:
    """A {key: array} mapping with the reader interface `convert_tensors` takes (`keys()`, `get(key)`)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def keys(self) -> list[str]:
        return list(self._arrays)

    def get(self, key: str) -> np.ndarray:
        return self._arrays[key]


def read_state_dict(path: str):
    """The tensors of a .pth / .safetensors / .npz Inception checkpoint, as a `keys()`/`get()` reader."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found (pytorch-fid's pt_inception-2015-12-05-"
                                "6726825d.pth, or a .safetensors/.npz converted from it)")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return _ArrayDict({k: f[k] for k in f.files})
    if path.endswith((".pth", ".pt")):
        try:
            import torch  # only this format needs torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs torch; convert it once on a machine with torch: "
                              "python -m swd_jax.convert.inception IN.pth OUT.safetensors") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
        return _ArrayDict({k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                           for k, v in sd.items()})
    raise ValueError(f"Inception weights {path}: unknown format (use .pth, .safetensors or .npz)")


def rename(key: str):
    """`Mixed_5b.branch1x1.conv.weight` -> (`Mixed_5b/branch1x1/conv/kernel`, conv transform); bn likewise."""
    *mods, leaf = key.split(".")
    if mods and mods[-1] == "conv" and leaf == "weight":
        return tuple(mods) + ("kernel",), conv_to_kernel
    if mods and mods[-1] == "bn" and leaf in _BN:
        return tuple(mods) + (_BN[leaf],), identity
    return None


def _skippable(tensors) -> dict:
    """The keys FID does not use, each with its check: fc head shapes, any batch counter."""
    checks = {k: (lambda a, s=s: tuple(a.shape) == s) for k, s in _FC_SHAPES.items()}
    checks.update({k: (lambda a: True) for k in tensors.keys() if k.endswith(".num_batches_tracked")})
    return checks


def load_inception(path: str, resize_input: bool = True) -> tuple[FIDInceptionV3, dict]:
    """(model, params as float32 numpy) from pytorch-fid's Inception weights; strict."""
    model = FIDInceptionV3(resize_input=resize_input)
    abstract = abstract_params(model, jnp.zeros((1, 299, 299, 3), jnp.float32))
    tensors = read_state_dict(path)
    params = convert_tensors(tensors, rename, abstract, where=f"Inception {path}", buffers=_skippable(tensors))
    return model, params


def main(argv: list[str] | None = None) -> None:
    """`python -m swd_jax.convert.inception IN.pth OUT.safetensors`: the same keys, readable without torch."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].endswith((".safetensors", ".npz")):
        raise SystemExit("usage: python -m swd_jax.convert.inception IN.pth OUT.safetensors|OUT.npz")
    src, dst = argv
    load_inception(src)  # refuse to write a file that would not load
    tensors = read_state_dict(src)
    arrays = {k: np.ascontiguousarray(tensors.get(k)) for k in tensors.keys()}
    if dst.endswith(".npz"):
        np.savez(dst, **arrays)
    else:
        from safetensors.numpy import save_file
        save_file(arrays, dst)
    print(f"wrote {dst} ({len(arrays)} tensors)")


if __name__ == "__main__":
    main()
