"""Peak host memory of converting a diffusers SD3 transformer (a few hundred MB) into our Flax params.

    python benchmarks/conversion_memory.py [--layers 8] [--heads 12] [--dtype float32]

Builds a random-weight diffusers SD3Transformer2DModel, saves it as safetensors, then converts it in a fresh
process (which imports no torch) and prints the checkpoint size, the process's peak RSS before and after the
conversion, and the ratio of the conversion's extra peak to one copy of the weights. Also times a forward pass
of a tiny model in JAX and in PyTorch on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
from swd_jax.convert.converted import load_diffusers
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss_mb()
t = time.perf_counter()
cfg, params = load_diffusers(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
jax.block_until_ready(params)
dt = time.perf_counter() - t
n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
print(json.dumps({"peak_before_mb": before, "peak_after_mb": rss_mb(), "params_mb": n, "seconds": dt,
                  "torch_imported": "torch" in sys.modules}))
"""


def tiny_forward_times(repeats: int = 20) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from swd_jax.convert.transformer import convert_state_dict
    from swd_jax.models.mmdit import MMDiT, MMDiTConfig
    from tests.torch_reference import sd3_inputs, tiny_sd3_config, tiny_sd3_transformer

    model = tiny_sd3_transformer("sd35_medium", num_layers=4)
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium", 4))
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    x, t, c, p = sd3_inputs(tiny_sd3_config("sd35_medium"), batch=4, latent=16)
    fwd = jax.jit(lambda prm, *a: MMDiT(cfg).apply({"params": prm}, *a))
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), jnp.asarray(p))
    fwd(params, *args).block_until_ready()
    tj = []
    for _ in range(repeats):
        s = time.perf_counter()
        fwd(params, *args).block_until_ready()
        tj.append(time.perf_counter() - s)
    tt = []
    targs = [torch.from_numpy(a) for a in (x, t, c, p)]
    with torch.no_grad():
        for _ in range(repeats + 1):
            s = time.perf_counter()
            model(hidden_states=targs[0], timestep=targs[1], encoder_hidden_states=targs[2],
                  pooled_projections=targs[3])
            tt.append(time.perf_counter() - s)
    return {"jax_ms": 1e3 * float(np.median(tj)), "torch_ms": 1e3 * float(np.median(tt[1:]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    import torch
    from diffusers import SD3Transformer2DModel
    with tempfile.TemporaryDirectory() as d:
        cfg = dict(sample_size=64, patch_size=2, in_channels=16, num_layers=args.layers, attention_head_dim=64,
                   num_attention_heads=args.heads, joint_attention_dim=1024, caption_projection_dim=64 * args.heads,
                   pooled_projection_dim=512, out_channels=16, pos_embed_max_size=64,
                   dual_attention_layers=(0, 1), qk_norm="rms_norm")
        model = SD3Transformer2DModel(**cfg)
        model.save_pretrained(d)
        del model
        size = os.path.getsize(os.path.join(d, "diffusion_pytorch_model.safetensors")) / 2**20
        root = os.path.join(os.path.dirname(__file__), "..")
        out = subprocess.run([sys.executable, "-c", CHILD, d, args.dtype], capture_output=True, text=True,
                             cwd=root, env=dict(os.environ, PYTHONPATH=root))
        if out.returncode:
            raise SystemExit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    extra = r["peak_after_mb"] - r["peak_before_mb"]
    print(f"checkpoint {size:.0f} MB (float32 safetensors) -> params {r['params_mb']:.0f} MB {args.dtype} "
          f"in {r['seconds']:.1f} s; torch imported by the converter: {r['torch_imported']}")
    print(f"peak RSS before {r['peak_before_mb']:.0f} MB, after {r['peak_after_mb']:.0f} MB: conversion added "
          f"{extra:.0f} MB = {extra / r['params_mb']:.2f} x one copy of the converted weights")
    del torch
    f = tiny_forward_times()
    print(f"tiny SD3.5-M-shaped forward (4 layers, width 32, batch 4, 16x16 latent): JAX {f['jax_ms']:.2f} ms, "
          f"PyTorch {f['torch_ms']:.2f} ms (median of 20, CPU)")


if __name__ == "__main__":
    main()
