"""TPU levers that are not config options, each compiled beside the default program at one cut depth.

    python -m benchmarks.tpu_levers --lever bf16_elementwise --blocks 4 --batch 8              # the top interval
    python -m benchmarks.tpu_levers --lever replicated_base --blocks 4 --batch 8 --interval 0  # latents 64

- `replicated_base`: the frozen base weights replicated on every chip instead of FSDP-sharded over the chips: no
  weight all-gathers in any pass of the iteration, at the base's whole size per chip (SD3.5-Medium: 4.7 GiB bf16).
- `bf16_elementwise`: LayerNorm outputs, the modulation x (1 + scale) + shift and the AdaLN shifts, scales and
  gates in bf16 (as diffusers' bf16 model rounds them), instead of float32.

Both programs are the trainer's iteration as `benchmarks.tpu_plan` compiles it (SD3.5-Medium cut to `--blocks`,
remat full, splash attention); the lever is patched in for its compile only. Prints one row per program and the
ratios. A lever that moves neither the estimated time nor the memory is not worth an option.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

from benchmarks import abstract_train, tpu_plan
from swd_jax.models import layers, mmdit
from swd_jax.train import sharding


def _replicated_base(shape, mesh, rules=sharding.DEFAULT_RULES, groups=()):
    base, sh = _default_base(shape, mesh, rules, groups)
    sh = jax.tree.map(lambda _: sharding.replicated(mesh), sh)
    return abstract_train._with_sharding(base, sh), sh


_default_base = abstract_train.abstract_base
_default_adaln = mmdit.AdaLN.__call__


def _layer_norm_bf16(x, eps: float = 1e-6):
    return layers.layer_norm(x, eps).astype(x.dtype)


def _modulate_bf16(x_BLD, shift_BD, scale_BD):
    dt = x_BLD.dtype
    return x_BLD * (1.0 + scale_BD.astype(dt)[:, None]) + shift_BD.astype(dt)[:, None]


def _adaln_bf16(self, temb_BD):
    return [m.astype(self.dtype) for m in _default_adaln(self, temb_BD)]


LEVERS = {
    "replicated_base": lambda: [mock.patch.object(abstract_train, "abstract_base", _replicated_base)],
    "bf16_elementwise": lambda: [mock.patch.object(mmdit, "layer_norm", _layer_norm_bf16),
                                 mock.patch.object(mmdit, "modulate", _modulate_bf16),
                                 mock.patch.object(mmdit.AdaLN, "__call__", _adaln_bf16)],
}


def compile_row(lever: str | None, blocks: int, batch: int, topo: str, k: int | None) -> dict:
    shape = tpu_plan.cut(tpu_plan.MEDIUM, blocks, batch)
    with contextlib.ExitStack() as stack:
        for patch in (LEVERS[lever]() if lever else []):
            stack.enter_context(patch)
        return tpu_plan.compile_plan(shape, topo, "", k)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lever", required=True, choices=sorted(LEVERS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--interval", type=int, default=None, help="scale interval, 0 the smallest (default: the top)")
    a = ap.parse_args(argv)
    rows = {}
    for lever in (None, a.lever):
        name = lever or "default"
        print(f"SD3.5-Medium[{a.blocks} blocks] on {a.topology}, {a.batch} images/chip, {name}: compiling ...",
              flush=True)
        rows[name] = compile_row(lever, a.blocks, a.batch, a.topology, a.interval)
    print(f"\n{'program':18s} {'peak GiB':>9s} {'temp GiB':>9s} {'s/iter':>8s} {'MFU':>6s} {'compile s':>9s}")
    for name, r in rows.items():
        print(f"{name:18s} {r['peak_gib']:9.2f} {r['temp_gib']:9.2f} {tpu_plan._f(r['seconds'], 8, 3)} "
              f"{tpu_plan._f(r['mfu'], 6, 3)} {r['compile_s']:9.0f}")
    d, x = rows["default"], rows[a.lever]
    if d["seconds"] and x["seconds"]:
        print(f"{a.lever} / default: time {x['seconds'] / d['seconds']:.3f}x, peak {x['peak_gib'] / d['peak_gib']:.3f}x")


if __name__ == "__main__":
    main()
