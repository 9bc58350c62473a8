"""TPU plan: the SwD iteration compiled by the TPU compiler for a TPU slice, from a CPU host (libtpu, no TPU).

    python -m benchmarks.tpu_plan --model medium --topology v5p:2x2x1 --batch 8
    python -m benchmarks.tpu_plan --model medium --topology v5p:2x2x1 --batch 4,8 --blocks 2,4 \\
        --json benchmarks/tpu_plan.json      # depth and batch slopes, full depth extrapolated

The program is the one `swd_jax.train.loop.compile_iterations` jits (`benchmarks/abstract_train.py`: the
whole iteration, state donated, base FSDP-sharded over a (1, chips, 1) mesh, batch split over it) at the
full-resolution interval (1024 px), splash attention (the real Mosaic kernel), bf16 compute and base,
f32 LoRA and AdamW states. `jax.experimental.topologies.get_topology_desc` gives the slice's abstract TPU
devices; `.lower(abstract inputs).compile()` runs the TPU compiler, so `memory_analysis()` is the TPU
buffer assignment and `cost_analysis()` gives the FLOPs per chip and `optimal_seconds`, the compiler's own
estimate of the step time. Per chip we print arguments, temporaries and peak; FLOPs; estimated seconds per
iteration; images/s (all n_fake + 1 batches of the iteration, as the trainer logs it); MFU = model FLOPs
(the iteration without remat, XLA attention, counted before optimisation) / (chips x peak bf16 x time).

`--blocks 2,4` compiles the model cut to that many blocks (dual-attention blocks and the feature block
scaled in proportion) and extrapolates every figure linearly in depth to the full model; with two batches
also linearly in batch, which gives the largest per-chip batch that fits HBM at full depth. Rows computed
that way say `extrapolated`. A full-depth SD3.5-Medium compile takes > 30 min and ~17 GB of host memory on
a 2-core machine: run one at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the TPU compiler comes from libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only use: no chip to lock

import flax.linen as nn
import jax

from benchmarks.abstract_train import (
    LARGE,
    MEDIUM,
    TrainShape,
    abstract_base,
    abstract_batches,
    abstract_state,
    build_models,
    lower_iteration,
    memory_per_device,
)
from swd_jax.models import mmdit
from swd_jax.train import sharding
from swd_jax.train.steps import fake_loss


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM and dense bf16 peak per chip."""
    hbm_gib: float
    peak_flops: float


CHIPS = {"v5p": Chip(95.0, 459e12), "v6e": Chip(32.0, 918e12), "v4": Chip(32.0, 275e12)}
SHAPES = {"medium": MEDIUM, "large": LARGE}
HEADROOM = 0.10  # the goal: peak within 90 % of HBM


def topology(name: str):
    """(abstract TPU devices, chips) of a topology like 'v5p:2x2x1'; a device may be one core of a chip (v4)."""
    from jax.experimental import topologies
    kind, dims = name.split(":")
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation {kind!r} in {name!r}; known: {sorted(CHIPS)}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    return devices, math.prod(int(d) for d in dims.split("x"))


def cut(shape: TrainShape, blocks: int | None, batch: int) -> TrainShape:
    """`shape` at `batch` images per chip, with only `blocks` blocks (dual-attention and feature block scaled)."""
    shape = dataclasses.replace(shape, batch_per_device=batch, attention_impl="splash")
    full = shape.model.num_layers
    if not blocks or blocks == full:
        return shape
    dual = round(len(shape.model.dual_attention_layers) * blocks / full)
    model = dataclasses.replace(shape.model, num_layers=blocks, dual_attention_layers=tuple(range(dual)))
    cls = min(blocks - 1, round(shape.cls_block * blocks / full))
    return dataclasses.replace(shape, model=model, cls_block=cls, name=f"{shape.name}[{blocks} blocks]")


def model_flops(shape: TrainShape, chips: int, attention: bool = True) -> tuple[float, float]:
    """(FLOPs of the iteration as cost analyses count it, FLOPs of one fake update) for all chips' batches.

    The iteration as written (no remat, XLA attention; with `attention=False` the attention counts nothing),
    before optimisation, on one host CPU device (the TPU compile-only client gives no pre-optimisation
    analysis). Every cost analysis, the TPU compiler's too, counts the body of the fake updates' `scan` (a
    while loop) once, not n_fake times (checked: n_fake 1 and 2 give the same counts); the second figure is
    that body, the fake loss's value and gradient.
    """
    plain = dataclasses.replace(shape, remat=False, attention_impl="xla", batch_per_device=shape.batch_per_device * chips)
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    no_attention = lambda q_BLHD, k_BSHD, v_BSHD, *_: q_BLHD
    with mock.patch.object(mmdit, "dot_product_attention", mmdit.dot_product_attention if attention else no_attention):
        iteration = float(lower_iteration(plain, one).cost_analysis()["flops"])
        m = build_models(plain)
        k = m.schedule.num_intervals - 1
        state, _ = abstract_state(m, one)
        batches, _ = abstract_batches(plain, m, one, k)
        batch = {name: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for name, x in batches.items()}
        base, _ = abstract_base(plain, one)
        grad = jax.value_and_grad(fake_loss, argnums=1, has_aux=True)
        fn = jax.jit(lambda st, b, x: grad(m, st["fake"], b, st["student"], x, k, jax.random.key(0)))
        with jax.set_mesh(one), nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
            body = float(fn.lower(state, base, batch).cost_analysis()["flops"])
    return iteration, body


def figures(shape: TrainShape, topo: str, compiler_flops: float, compiler_seconds: float) -> dict:
    """FLOPs per chip, seconds, images/s and MFU of an iteration from the TPU compiler's per-chip counts.

    Two corrections: the compiler counts the fake-update loop once (scaled up by the model FLOPs' ratio), and
    it gives the Mosaic splash kernels no FLOPs and no time (checked: a splash-only program counts 1e-4 of the
    attention's FLOPs) -- their FLOPs are added at the chip's peak, so the seconds are a lower bound and the
    MFU an upper bound (SD3.5's head dim 64 fills half of v5p's 128-deep MXU in q k^T: expect less).
    """
    _, chips = topology(topo)
    chip = CHIPS[topo.split(":")[0]]
    n = shape.n_fake_steps
    counted, body = model_flops(shape, chips)
    counted_na, body_na = model_flops(shape, chips, attention=False)
    total, rest = counted + (n - 1) * body, counted_na + (n - 1) * body_na
    attention, loop = total - rest, rest / counted_na
    seconds = compiler_seconds * loop + attention / (chips * chip.peak_flops)
    images = (n + 1) * shape.batch_per_device * chips
    return {"compiler_flops": compiler_flops, "compiler_seconds": compiler_seconds, "loop_correction": loop,
            "attention_flops": attention, "model_flops": total, "flops_per_chip": compiler_flops * loop
            + attention / chips, "seconds": seconds, "images_per_s": images / seconds,
            "mfu": total / (chips * chip.peak_flops * seconds)}


def compile_plan(shape: TrainShape, topo: str) -> dict:
    """Per-chip memory, FLOPs, estimated time and MFU of `shape`'s iteration compiled for the slice `topo`."""
    devices, chips = topology(topo)
    per_chip = len(devices) // chips  # devices per chip (2 on v4: one per TensorCore)
    mesh = sharding.make_mesh((1, len(devices), 1), devices=devices)
    t = time.perf_counter()
    compiled = lower_iteration(dataclasses.replace(shape, batch_per_device=shape.batch_per_device // per_chip
                                                   or 1), mesh).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    mem = {k: v * per_chip for k, v in memory_per_device(compiled).items()}
    return {"model": shape.name, "blocks": shape.model.num_layers, "topology": topo, "chips": chips,
            "batch_per_chip": shape.batch_per_device, **mem, "hbm_gib": CHIPS[topo.split(":")[0]].hbm_gib,
            **figures(shape, topo, float(cost["flops"]) * per_chip, float(cost["optimal_seconds"])),
            "mosaic_kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
            "compile_s": compile_s, "extrapolated": False}


LINEAR = ("arguments_gib", "outputs_gib", "temp_gib", "alias_gib", "peak_gib", "flops_per_chip", "model_flops",
          "seconds", "attention_flops", "compiler_flops", "compiler_seconds")


def _line(x0, y0, x1, y1, x):
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def extrapolate(rows: list[dict], full_blocks: int) -> list[dict]:
    """Full-depth rows from rows at two depths (per batch): every size and time linear in the block count."""
    out = []
    for b in sorted({r["batch_per_chip"] for r in rows}):
        at = sorted((r for r in rows if r["batch_per_chip"] == b), key=lambda r: r["blocks"])
        if len(at) < 2 or at[-1]["blocks"] == full_blocks:
            continue
        r0, r1 = at[0], at[-1]
        if r1["peak_gib"] < r0["peak_gib"]:  # seen at 4 images/chip: 1 -> 2 blocks, 6.5 -> 6.2 GiB; no line
            print(f"no depth extrapolation at {b} images/chip: the peak falls with depth "
                  f"({r0['peak_gib']:.1f} GiB at {r0['blocks']} blocks, {r1['peak_gib']:.1f} at {r1['blocks']})")
            continue
        row = {**r1, "blocks": full_blocks, "extrapolated": True, "compile_s": None,
               "model": r1["model"].split("[")[0]}
        for k in (k for k in LINEAR if k in r0 and k in r1):
            row[k] = _line(r0["blocks"], r0[k], r1["blocks"], r1[k], full_blocks)
        chip = CHIPS[row["topology"].split(":")[0]]
        images = r1["images_per_s"] * r1["seconds"]
        row.update(images_per_s=images / row["seconds"],
                   mfu=row["model_flops"] / (row["chips"] * chip.peak_flops * row["seconds"]))
        out.append(row)
    return out


def largest_batch(rows: list[dict], hbm_gib: float, headroom: float = 0.0) -> int | None:
    """The largest per-chip batch whose peak (linear in batch through the two largest measured) fits HBM.

    With one batch measured: that batch if it fits (a lower bound), else None.
    """
    by_b = sorted(rows, key=lambda r: r["batch_per_chip"])
    if len(by_b) < 2:
        return by_b[0]["batch_per_chip"] if by_b and by_b[0]["peak_gib"] <= hbm_gib * (1 - headroom) else None
    r0, r1 = by_b[-2], by_b[-1]
    slope = (r1["peak_gib"] - r0["peak_gib"]) / (r1["batch_per_chip"] - r0["batch_per_chip"])
    fixed = r1["peak_gib"] - slope * r1["batch_per_chip"]
    b = math.floor((hbm_gib * (1 - headroom) - fixed) / slope) if slope > 0 else None
    return b if b is not None and b >= 1 else None


def _print(rows):
    print(f"\n{'model':24s} {'topology':10s} {'b/chip':>6s} {'args':>6s} {'temp':>6s} {'peak':>6s} {'HBM':>4s} "
          f"{'TFLOP/chip':>10s} {'s/iter':>7s} {'img/s':>6s} {'MFU':>5s}")
    for r in rows:
        print(f"{r['model'] + (' *' if r['extrapolated'] else ''):24s} {r['topology']:10s} {r['batch_per_chip']:6d} "
              f"{r['arguments_gib']:6.1f} {r['temp_gib']:6.1f} {r['peak_gib']:6.1f} {r['hbm_gib']:4.0f} "
              f"{r['flops_per_chip'] / 1e12:10.1f} {r['seconds']:7.3f} {r['images_per_s']:6.1f} {r['mfu']:5.2f}")
    print("GiB per chip; * extrapolated linearly in depth from the cut models above")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="medium", choices=sorted(SHAPES))
    ap.add_argument("--topology", default="v5p:2x2x1", help="e.g. v5p:2x2x1, v5p:2x2x2, v6e:2x2, v4:2x2x1")
    ap.add_argument("--batch", default="", help="comma-separated per-chip batches (default: the reference)")
    ap.add_argument("--blocks", default="", help="comma-separated depths to compile (default: the full model)")
    ap.add_argument("--json", default="", help="rows are kept in (and reused from) this file; launch/tpu_pod.sh "
                    "reads benchmarks/tpu_plan.json")
    a = ap.parse_args(argv)
    shape = SHAPES[a.model]
    batches = [int(b) for b in a.batch.split(",")] if a.batch else [shape.batch_per_device]
    depths = [int(n) for n in a.blocks.split(",")] if a.blocks else [None]
    full, hbm, key = shape.model.num_layers, CHIPS[a.topology.split(":")[0]].hbm_gib, f"{a.model}@{a.topology}"
    plans = {}
    if a.json and os.path.exists(a.json):
        with open(a.json) as f:
            plans = json.load(f)
    rows = [r for r in plans.get(key, {}).get("rows", []) if not r["extrapolated"]]  # compiled before: reused
    for r in rows:
        if "loop_correction" in r and "compiler_seconds" not in r:  # a row of the first version: loop-corrected only, recounted here
            raw = (r["flops_per_chip"] / r["loop_correction"], r["seconds"] / r["loop_correction"])
            r.update(figures(cut(shape, r["blocks"], r["batch_per_chip"]), a.topology, *raw))
    for n in depths:
        for b in batches:
            s = cut(shape, n, b)
            if any((r["blocks"], r["batch_per_chip"]) == (s.model.num_layers, b) for r in rows):
                print(f"{s.name} on {a.topology}, {b} images/chip: in {a.json} already", flush=True)
                continue
            print(f"{s.name} on {a.topology}, {b} images/chip: compiling ...", flush=True)
            rows.append(compile_plan(s, a.topology))
            r = rows[-1]
            print(f"  {r['compile_s']:.0f} s: peak {r['peak_gib']:.1f} GiB/chip (arguments {r['arguments_gib']:.2f}, "
                  f"temporaries {r['temp_gib']:.1f}), {r['seconds']:.3f} s/iteration, MFU {r['mfu']:.2f}", flush=True)
            if a.json:  # written after every compile: a long run keeps what it measured
                plans[key] = _summary(a, shape, rows, full, hbm)
                with open(a.json, "w") as f:
                    json.dump(plans, f, indent=1)
    summary = _summary(a, shape, rows, full, hbm)
    if a.json:  # rows recounted by a newer version land in the file too
        plans[key] = summary
        with open(a.json, "w") as f:
            json.dump(plans, f, indent=1)
    _print(sorted(summary["rows"], key=lambda r: (r["blocks"], r["batch_per_chip"])))
    print(f"largest batch/chip that fits {hbm:.0f} GiB: {summary['max_batch_per_chip']} "
          f"(with {HEADROOM:.0%} headroom: {summary['max_batch_per_chip_10pct_headroom']})")


def _summary(a, shape: TrainShape, rows: list[dict], full: int, hbm: float) -> dict:
    rows = rows + extrapolate(rows, full)
    final = [r for r in rows if r["blocks"] == full]
    return {"model": shape.name, "topology": a.topology, "hbm_gib": hbm,
            "max_batch_per_chip": largest_batch(final, hbm),
            "max_batch_per_chip_10pct_headroom": largest_batch(final, hbm, HEADROOM),
            "max_batch_is_lower_bound": len({r["batch_per_chip"] for r in final}) < 2,  # one batch measured
            "extrapolated": any(r["extrapolated"] for r in final), "rows": rows}


if __name__ == "__main__":
    main()
