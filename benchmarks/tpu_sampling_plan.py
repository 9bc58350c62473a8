"""TPU plan for teacher sampling: one 1024 px teacher Euler step compiled for a TPU slice, from a CPU host (libtpu).

    python -m benchmarks.tpu_sampling_plan --model medium --topology v5p:2x2x1 --batch 1,2 \\
        --json benchmarks/tpu_sampling_plan.json     # full depth, blocks scanned; the batch slope
    python -m benchmarks.tpu_sampling_plan --json benchmarks/tpu_sampling_plan.json --table

The program is the one `swd-generate --sampler teacher` runs per step (`swd_jax.method.sampler._euler_step` with the
pipeline's teacher velocity): SD3.5 with CFG (cond and uncond in one forward of 2 x batch), FLUX-dev with its
embedded guidance (no CFG batch); latent 128 (1024 px), bf16 compute and weights, splash attention
(`--attention xla` for the XLA one), weights replicated and the batch split over the chips (data parallel, as
the pipeline places them; a per-chip program, so the chip count of the topology does not change it). As
`benchmarks/tpu_plan.py` does for training: `memory_analysis()` gives the per-chip memory, `cost_analysis()` the
FLOPs and the compiler's `optimal_seconds`, to which the splash kernels' FLOPs are added at the chip's peak (the
compiler counts none for Mosaic kernels), so the seconds are a lower bound. A sampled image costs STEPS (28)
such steps; the text encoders and the VAE decoder (once per image, < 1 % of the FLOPs) are not counted.

By default the full model is compiled with its runs of identical blocks under one scan (`--no-scan-blocks`:
unrolled), as SwDPipeline runs it on a TPU: about 2 min and 1.4 GB of host memory per row on a 2-core host for
SD3.5-Medium or FLUX-dev. A cost analysis counts a scanned loop's body once: the compiler's FLOPs and seconds
are scaled by `loop_correction` (the unrolled over the scanned step's FLOPs, attention aside, counted on the host).
`--blocks 2,4` compiles the model cut to that many blocks (FLUX: give multiples of 3, 3,6, which keep its
double-/single-stream proportion) and extrapolates every size and time linearly in depth to the full model; two
batches give the largest per-chip batch that fits HBM (peak linear in batch). Rows computed that way say
`extrapolated`; a plan with full-depth rows uses those alone. v6e: libtpu 0.0.42's cost model gives no time, so
its rows hold memory only (`memory_only`; `flops_at_peak_seconds` is every FLOP at peak, a looser bound).
Per plan: `max_batch_per_chip` (and with 10 % headroom), images/s per chip at the largest batch measured, and the
hours for 200 000 images on v5p-16 (8 chips) or, for v6e, on a v6e-8.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the TPU compiler comes from libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only use: no chip to lock

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.abstract_train import abstract_base, memory_per_device
from benchmarks.tpu_plan import (CHIPS, HEADROOM, SHAPES, _f, _line, attention_left_out, cut, depth, host_mesh,
                                 largest_batch, splash_flops, topology)
from swd_jax.models.backbone import backbone_of
from swd_jax.train import sharding

STEPS = 28  # the teacher's Euler steps (diffusers' SD3 and FLUX pipelines)
LATENT = 128  # 1024 px
SET_IMAGES = 200_000  # the official SwD training set
SLICE_CHIPS = {"v5p": 8, "v6e": 8, "v4": 8}  # v5p-16, v6e-8, v4-16
CFG = {"medium": 7.0, "large": 4.5, "flux": None}  # SD3.5 CFG scale; FLUX-dev: embedded guidance 3.5, no CFG
LINEAR = ("arguments_gib", "outputs_gib", "temp_gib", "peak_gib", "compiler_flops", "compiler_seconds",
          "splash_flops_per_chip")


def step_program(shape, mesh, attention: str, guidance: float | None, scan: bool = True):
    """(jitted teacher step, abstract args): x [B, 128, 128, C] -> x + (sigma' - sigma) v, B split over the chips;
    `scan`: runs of identical blocks under one scan, weights stacked (as SwDPipeline runs them on a TPU)."""
    from swd_jax.method.sampler import _euler_step
    cfg = shape.model
    bb = backbone_of(cfg)
    model = bb.module_cls(cfg, lora=None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=attention,
                          scan_blocks=scan)
    flux = guidance is None

    def teacher(params, x_BHWC, t_B, cond):  # as SwDPipeline's teacher: FLUX-dev gets the guidance per example
        extra = (cond["guidance"],) if "guidance" in cond else ()
        return model.apply({"params": params}, x_BHWC, t_B, cond["context"], cond["pooled"], *extra)

    base, _ = abstract_base(dataclasses.replace(shape, param_dtype="bfloat16"), mesh,  # fsdp 1: replicated
                            groups=model.block_groups())
    B = shape.batch_per_device * sharding.batch_divisor(mesh)
    bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    f32 = lambda dims, sh=bsh: jax.ShapeDtypeStruct(dims, jnp.float32, sharding=sh)
    x = f32((B, LATENT, LATENT, cfg.latent_channels))
    cond = {"context": f32((B, shape.text_tokens, cfg.joint_attention_dim)),
            "pooled": f32((B, cfg.pooled_projection_dim))}
    if flux and getattr(cfg, "guidance_embeds", False):
        cond["guidance"] = f32((B,))
    uncond = None if flux else jax.tree.map(lambda a: a, cond)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    args = (teacher, base, x, scalar, scalar, scalar, cond, uncond, scalar)
    return _euler_step, args, not flux


def compile_row(shape, topo: str, attention: str, guidance: float | None, scan: bool = True) -> dict:
    """Per-chip memory, FLOPs and estimated seconds of one teacher step of `shape` on the slice `topo`."""
    devices, chips = topology(topo)
    mesh = sharding.make_mesh((len(devices), 1, 1), devices=devices)
    loop = loop_correction(shape, guidance) if scan else 1.0
    fn, args, guided = step_program(shape, mesh, attention, guidance, scan)
    t = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
        compiled = fn.lower(*args, guided=guided).compile()
    compile_s = time.perf_counter() - t
    cost, hlo = compiled.cost_analysis(), compiled.as_text()
    splash = splash_flops(hlo) if attention != "xla" else 0.0
    row = {"model": shape.name, "blocks": depth(shape), "topology": topo, "chips": chips,
           "batch_per_chip": shape.batch_per_device, "attention": attention, "scan_blocks": scan, "cfg": guided,
           "forward_batch_per_chip": shape.batch_per_device * (2 if guided else 1),
           **memory_per_device(compiled), "hbm_gib": CHIPS[topo.split(":")[0]].hbm_gib,
           "compiler_flops": float(cost["flops"]), "compiler_seconds": float(cost["optimal_seconds"]),
           "splash_flops_per_chip": splash, "loop_correction": loop, "compile_s": compile_s,
           "host_max_rss_gib": _max_rss_gib(),
           "extrapolated": False}
    return {**row, **timing(row)}


def loop_correction(shape, guidance: float | None) -> float:
    """How many times more FLOPs the step runs than a cost analysis of its scanned program counts: every cost
    analysis (the TPU compiler's too) counts a while loop's body once, so a group of n scanned blocks counts as one.
    The ratio of the unrolled to the scanned step's counts, attention left out (splash is counted apart), both
    lowered on one host CPU device as `benchmarks.tpu_plan.scanned_flops` does for training."""
    one = host_mesh()
    counts = []
    for scan in (False, True):
        fn, args, guided = step_program(dataclasses.replace(shape, attention_impl="xla"), one, "xla", guidance, scan)
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_left_out())
            stack.enter_context(jax.set_mesh(one))
            stack.enter_context(nn.logical_axis_rules(list(sharding.DEFAULT_RULES)))
            counts.append(float(fn.lower(*args, guided=guided).cost_analysis()["flops"]))
    return counts[0] / counts[1]


def _max_rss_gib() -> float:
    """This process's peak resident memory so far (the host cost of the compiles it ran)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timing(row: dict) -> dict:
    """Seconds per step, images/s per chip and hours for 200 000 images on an 8-chip slice. Seconds: the compiler's
    estimate (times `loop_correction` for scanned blocks) + the splash FLOPs at peak (a lower bound). Where the
    compiler gives no time (libtpu 0.0.42's v6e cost model returns a negative one) the row is a memory row: no
    seconds, images/s or hours, only `flops_at_peak_seconds` (every FLOP at peak, a looser lower bound)."""
    chip = CHIPS[row["topology"].split(":")[0]]
    flops = row["compiler_flops"] * row.get("loop_correction", 1.0) + row["splash_flops_per_chip"]
    at_peak = flops / chip.peak_flops
    if row["compiler_seconds"] <= 0:
        return {"step_seconds": None, "time_source": None, "flops_at_peak_seconds": at_peak,
                "images_per_s_per_chip": None, "hours_200k": None}
    step = row["compiler_seconds"] * row.get("loop_correction", 1.0) + row["splash_flops_per_chip"] / chip.peak_flops
    ips = row["batch_per_chip"] / (STEPS * step)
    chips = SLICE_CHIPS[row["topology"].split(":")[0]]
    return {"step_seconds": step, "time_source": "compiler", "flops_at_peak_seconds": at_peak,
            "images_per_s_per_chip": ips, "hours_200k": SET_IMAGES / (chips * ips) / 3600}


def extrapolate(rows: list[dict], full: int) -> list[dict]:
    """Full-depth rows from the two deepest compiled cuts of each batch (every size and time linear in depth), for
    the batches that have no compiled full-depth row."""
    out = []
    for b in sorted({r["batch_per_chip"] for r in rows}):
        at = sorted((r for r in rows if r["batch_per_chip"] == b and not r["extrapolated"]), key=lambda r: r["blocks"])
        if len(at) < 2 or at[-1]["blocks"] == full:
            continue
        r0, r1 = at[-2], at[-1]
        row = {**r1, "blocks": full, "extrapolated": True, "compile_s": None, "model": r1["model"].split("[")[0]}
        for k in LINEAR:
            row[k] = _line(r0["blocks"], r0[k], r1["blocks"], r1[k], full)
        row.update(timing(row))
        out.append(row)
    return out


def summarise(model: str, topo: str, attention: str, rows: list[dict]) -> dict:
    """The plan of one (model, topology, attention): its rows, full-depth ones added, and the verdicts."""
    full = depth(SHAPES[model])
    rows = [r for r in rows if not r["extrapolated"]]
    if not any(r["blocks"] == full for r in rows):  # compiled at full depth: no extrapolated rows beside them
        rows = rows + extrapolate(rows, full)
    final = [r for r in rows if r["blocks"] == full]
    hbm = CHIPS[topo.split(":")[0]].hbm_gib
    timed = [r for r in final if r["images_per_s_per_chip"] is not None]
    best = max(timed, key=lambda r: r["batch_per_chip"]) if timed else None
    return {"model": SHAPES[model].name, "topology": topo, "attention": attention, "hbm_gib": hbm,
            "full_blocks": full, "steps": STEPS, "latent": LATENT, "cfg": CFG[model] is not None,
            "max_batch_per_chip": largest_batch(final, hbm) if final else None,
            "max_batch_per_chip_10pct_headroom": largest_batch(final, hbm, HEADROOM) if final else None,
            "max_batch_is_lower_bound": len({r["batch_per_chip"] for r in final}) < 2,
            "images_per_s_per_chip": best and best["images_per_s_per_chip"],
            "at_batch_per_chip": best and best["batch_per_chip"],
            "slice_chips": SLICE_CHIPS[topo.split(":")[0]], "hours_200k": best and best["hours_200k"],
            "extrapolated": any(r["extrapolated"] for r in final),
            "scan_blocks": sorted({r.get("scan_blocks", False) for r in final}) == [True],
            "memory_only": not timed, "rows": rows}


def plan_key(model: str, topo: str, attention: str = "splash") -> str:
    """'medium@v5p:2x2x1', with '/attention=xla' for XLA attention (as launch/plan_check.py reads it)."""
    return f"{model}@{topo}" + ("" if attention == "splash" else f"/attention={attention}")


def save(path: str, key: str, plan: dict) -> None:
    """Set `key` in the plan file (locked, atomic; other keys kept)."""
    import fcntl
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        plans = json.load(open(path)) if os.path.exists(path) else {}
        plans[key] = plan
        with open(path + ".tmp", "w") as f:
            json.dump(dict(sorted(plans.items())), f, indent=1)
        os.replace(path + ".tmp", path)
    os.remove(path + ".lock")


def markdown(plans: dict) -> str:
    """Every plan's full-depth rows as one markdown table."""
    out = ["| model | topology | attention | images/chip (forward batch) | peak GiB/chip (HBM) | s/step (≥) | "
           "images/s/chip (≤) | h for 200k on 8 chips | largest batch/chip (10 % headroom) |", "|" + "---|" * 9]
    for _, p in sorted(plans.items()):
        for r in sorted((r for r in p["rows"] if r["blocks"] == p["full_blocks"]), key=lambda r: r["batch_per_chip"]):
            out.append(f"| {p['model']}{' *' if r['extrapolated'] else ''} | {p['topology']} | {p['attention']} | "
                       f"{r['batch_per_chip']} ({r['forward_batch_per_chip']}) | {r['peak_gib']:.1f} "
                       f"({p['hbm_gib']:.0f}) | {_f(r['step_seconds'], 0, 3)} | "
                       f"{_f(r['images_per_s_per_chip'], 0, 3)} | {_f(r['hours_200k'], 0, 1)} | "
                       f"{p['max_batch_per_chip']} ({p['max_batch_per_chip_10pct_headroom']}) |")
    out.append("* extrapolated linearly in depth from cut-depth compiles")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="medium", choices=sorted(SHAPES))
    ap.add_argument("--topology", default="v5p:2x2x1", help="e.g. v5p:2x2x1, v6e:2x2")
    ap.add_argument("--batch", default="1,4", help="comma-separated images per chip (CFG doubles the forward)")
    ap.add_argument("--blocks", default="", help="comma-separated depths to compile (default: the full model)")
    ap.add_argument("--attention", default="splash", choices=("splash", "xla"))
    ap.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction, default=True,
                    help="runs of identical blocks under one scan (SwDPipeline's default on a TPU; full-depth "
                    "compiles take minutes, unrolled ones far longer)")
    ap.add_argument("--json", default="", help="rows are kept in (and reused from) this file; launch/plan_check.py "
                    "reads benchmarks/tpu_sampling_plan.json")
    ap.add_argument("--table", action="store_true", help="print the --json file's plans as markdown, compile nothing")
    a = ap.parse_args(argv)
    if a.table:
        print(markdown(json.load(open(a.json))))
        return
    key = plan_key(a.model, a.topology, a.attention)
    plans = json.load(open(a.json)) if a.json and os.path.exists(a.json) else {}
    rows = [r for r in plans.get(key, {}).get("rows", []) if not r["extrapolated"]]
    shape = SHAPES[a.model]
    for r in rows:  # scanned rows compiled before the loop correction: counted again (lowering only, no compile)
        if r.get("scan_blocks") and "loop_correction" not in r:
            s = cut(shape, r["blocks"] if r["blocks"] != depth(shape) else None, r["batch_per_chip"], remat="off",
                    attention=a.attention)
            r["loop_correction"] = loop_correction(s, CFG[a.model])
            r.update(timing(r))
            print(f"{r['model']}, {r['batch_per_chip']} images/chip: loop correction {r['loop_correction']:.2f}")
    for n in [int(x) for x in a.blocks.split(",")] if a.blocks else [None]:
        for b in [int(x) for x in a.batch.split(",")]:
            s = cut(shape, n, b, remat="off", attention=a.attention)
            if any((r["blocks"], r["batch_per_chip"], r.get("scan_blocks", False)) == (depth(s), b, a.scan_blocks)
                   for r in rows):
                print(f"{s.name} on {a.topology}, {b} images/chip: in {a.json} already", flush=True)
                continue
            print(f"{s.name} on {a.topology}, {b} images/chip, {a.attention}"
                  f"{', scanned blocks' if a.scan_blocks else ''}: compiling ...", flush=True)
            r = compile_row(s, a.topology, a.attention, CFG[a.model], a.scan_blocks)
            rows.append(r)
            print(f"  {r['compile_s']:.0f} s: peak {r['peak_gib']:.2f} GiB/chip (arguments {r['arguments_gib']:.2f}, "
                  f"temporaries {r['temp_gib']:.2f}), {_f(r['step_seconds'], 0, 4)} s/step", flush=True)
            if a.json:
                save(a.json, key, summarise(a.model, a.topology, a.attention, rows))
    plan = summarise(a.model, a.topology, a.attention, rows)
    if a.json:
        save(a.json, key, plan)
    print(markdown({key: plan}))
    print(f"largest batch/chip: {plan['max_batch_per_chip']} "
          f"(10 % headroom: {plan['max_batch_per_chip_10pct_headroom']}); "
          f"images/s/chip {_f(plan['images_per_s_per_chip'], 0, 3)} at {plan['at_batch_per_chip']}/chip; "
          f"hours for {SET_IMAGES} images on {plan['slice_chips']} chips: {_f(plan['hours_200k'], 0, 1)}")


if __name__ == "__main__":
    main()
