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
that way say `extrapolated`. With blocks under scan (the default) a full-depth SD3.5-Medium compile at 8
images/chip takes ~6.5 min plus ~2 min of host FLOP counts and 11 GB of host memory on a 2-core machine (the
unrolled one > 30 min and ~17 GB): run one at a time.

`--intervals` adds the seconds of every scale interval and the run's hours: estimated from the top interval by
FLOP share (a lower bound), or with `--intervals compile` each interval below the top compiled at full depth
(`--at-intervals 0,1`: only those; kept in the plan's `interval_rows`, `interval_compiled` says which were).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the TPU compiler comes from libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only use: no chip to lock

import flax.linen as nn
import jax

from benchmarks.abstract_train import (
    FLUX,
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
from benchmarks.splash_count import SPLASH_FLOPS, splash_flops  # noqa: F401 (re-exported)
from launch.plan_check import (  # the launcher reads these plans (standard library)
    has_full_depth,
    variant_suffix,
)
from swd_jax.models import flux, mmdit
from swd_jax.models.backbone import backbone_of
from swd_jax.models.flux import FluxConfig
from swd_jax.models.layers import REMAT_POLICIES, SPLASH_IMPLS
from swd_jax.train import sharding
from swd_jax.train.steps import fake_loss


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM and dense bf16 peak per chip."""
    hbm_gib: float
    peak_flops: float


CHIPS = {"v5p": Chip(95.0, 459e12), "v6e": Chip(32.0, 918e12), "v4": Chip(32.0, 275e12),
         "v5e": Chip(16.0, 197e12)}  # v5e: the v5litepod-N accelerator types (launch/plan_check.py GENERATIONS)
SHAPES = {"medium": MEDIUM, "large": LARGE, "flux": FLUX}
REMAT = {**{p: dict(remat=True, remat_policy=p) for p in REMAT_POLICIES}, "off": dict(remat=False)}
HEADROOM = 0.10  # the goal: peak within 90 % of HBM


def topology(name: str):
    """(abstract TPU devices, chips) of a topology like 'v5p:2x2x1': one device per chip, as jax on a TPU VM sees
    it (v4 and v5p chips have two TensorCores that run as one device, megacore; v4's topology description gives
    one device per TensorCore unless asked for megacore)."""
    from jax.experimental import topologies
    kind, dims = name.split(":")
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation {kind!r} in {name!r}; known: {sorted(CHIPS)}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                           **({"chip_config_name": "megacore"} if kind == "v4" else {})).devices
    return devices, math.prod(int(d) for d in dims.split("x"))


def depth(shape: TrainShape) -> int:
    """Blocks of the model: MMDiT's joint blocks; FLUX's double- plus single-stream blocks."""
    return backbone_of(shape.model).num_blocks(shape.model)


def cut(shape: TrainShape, blocks: int | None, batch: int, remat: str = "full",
        attention: str = "splash", without_remat: int = 0) -> TrainShape:
    """`shape` at `batch` images per chip, with only `blocks` blocks (block kinds and feature block scaled).

    MMDiT: the first round(dual x blocks / depth) blocks have dual attention. FLUX: double-stream blocks in
    their proportion (19 of 57; depths that are multiples of 3 keep it exactly), the rest single-stream.
    """
    shape = dataclasses.replace(shape, batch_per_device=batch, attention_impl=attention, **REMAT[remat],
                                blocks_without_remat=without_remat)
    full = depth(shape)
    if not blocks or blocks == full:
        return shape
    if without_remat * blocks % full:  # the cut keeps the fraction exactly, or depth extrapolation is off
        raise ValueError(f"--blocks-without-remat {without_remat} of {full} blocks does not scale to a {blocks}-block "
                         f"cut (pick depths that are multiples of {full // math.gcd(full, without_remat)})")
    shape = dataclasses.replace(shape, blocks_without_remat=without_remat * blocks // full)
    if isinstance(shape.model, FluxConfig):
        double = max(1, round(shape.model.num_layers * blocks / full))
        model = dataclasses.replace(shape.model, num_layers=double, num_single_layers=blocks - double)
    else:
        dual = round(len(shape.model.dual_attention_layers) * blocks / full)
        model = dataclasses.replace(shape.model, num_layers=blocks, dual_attention_layers=tuple(range(dual)))
    cls = min(blocks - 1, round(shape.cls_block * blocks / full))
    return dataclasses.replace(shape, model=model, cls_block=cls, name=f"{shape.name}[{blocks} blocks]")


def _plain(shape: TrainShape, chips: int, scan_blocks: bool) -> TrainShape:
    """`shape` as the FLOP counts lower it: all chips' batches on one device, no remat, XLA attention."""
    return dataclasses.replace(shape, remat=False, blocks_without_remat=0, attention_impl="xla",
                               batch_per_device=shape.batch_per_device * chips, scan_blocks=scan_blocks)


def host_mesh():
    """One host CPU device as a (1, 1, 1) mesh: where the pre-optimisation FLOP counts are lowered."""
    return sharding.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])


@contextlib.contextmanager
def attention_left_out():
    """Our models with attention counting nothing (q passes through): the FLOPs of everything else."""
    no_attention = lambda q_BLHD, k_BSHD, v_BSHD, *_, **__: q_BLHD
    with contextlib.ExitStack() as stack:
        for module in (mmdit, flux):
            stack.enter_context(mock.patch.object(module, "dot_product_attention", no_attention))
        yield


def model_flops(shape: TrainShape, chips: int, attention: bool = True, k: int | None = None) -> tuple[float, float]:
    """(FLOPs of the iteration as cost analyses count it, FLOPs of one fake update) for all chips' batches.

    The iteration as written (no remat, XLA attention; with `attention=False` the attention counts nothing),
    before optimisation, on one host CPU device (the TPU compile-only client gives no pre-optimisation
    analysis). Every cost analysis, the TPU compiler's too, counts the body of the fake updates' `scan` (a
    while loop) once, not n_fake times (checked: n_fake 1 and 2 give the same counts); the second figure is
    that body, the fake loss's value and gradient.
    """
    plain = _plain(shape, chips, scan_blocks=False)
    one = host_mesh()
    with contextlib.ExitStack() as stack:
        if not attention:
            stack.enter_context(attention_left_out())
        iteration = float(lower_iteration(plain, one, k).cost_analysis()["flops"])
        m = build_models(plain)
        k = m.schedule.num_intervals - 1 if k is None else k
        state, _ = abstract_state(m, one)
        batches, _ = abstract_batches(plain, m, one, k)
        batch = {name: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for name, x in batches.items()}
        base, _ = abstract_base(plain, one)
        grad = jax.value_and_grad(fake_loss, argnums=1, has_aux=True)
        fn = jax.jit(lambda st, b, x: grad(m, st["fake"], b, st["student"], x, k, jax.random.key(0)))
        with jax.set_mesh(one), nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
            body = float(fn.lower(state, base, batch).cost_analysis()["flops"])
    return iteration, body


def interval_seconds(shape: TrainShape, top_seconds: float) -> list[float]:
    """Estimated seconds of an iteration at every scale interval: the top interval's seconds (compiled, or
    extrapolated) times each interval's share of its model FLOPs (attention included; n_fake fake updates counted
    in full; one chip's batch: the shares do not depend on the chip count). The smaller intervals are not compiled:
    their fixed costs (weight gathers, optimiser) make this a lower bound (`--intervals compile` compiles them)."""
    n = shape.n_fake_steps
    total = []
    for k in range(build_models(shape).schedule.num_intervals):
        counted, body = model_flops(shape, 1, k=k)
        total.append(counted + (n - 1) * body)
    return [top_seconds * t / total[-1] for t in total]


def run_hours(interval_s: list[float], steps: int) -> float:
    """Hours of `steps` iterations visiting interval step mod K (the trainer's order), compiles not included."""
    K = len(interval_s)
    return sum(len(range(k, steps, K)) * s for k, s in enumerate(interval_s)) / 3600


def scanned_flops(shape: TrainShape, chips: int, k: int | None = None) -> float:
    """FLOPs of the iteration without attention as a cost analysis counts the scanned program: every while loop
    (the blocks' scans, the fake updates) once; `model_flops`' conventions otherwise."""
    with attention_left_out():
        return float(lower_iteration(_plain(shape, chips, shape.scan_blocks), host_mesh(), k).cost_analysis()["flops"])


def figures(shape: TrainShape, topo: str, compiler_flops: float, compiler_seconds: float,
            splash_per_chip: float | None = None, k: int | None = None) -> dict:
    """FLOPs per chip, seconds, images/s and MFU of an iteration from the TPU compiler's per-chip counts.

    Two corrections: the compiler counts the fake-update loop once (scaled up by the model FLOPs' ratio), and
    it gives the Mosaic splash kernels no FLOPs and no time (checked: a splash-only program counts 1e-4 of the
    attention's FLOPs) -- the FLOPs the kernels execute (`splash_flops`: padding and remat's repeated forwards
    included; the model's attention FLOPs if not given) are added at the chip's peak, so the seconds are a
    lower bound and the MFU an upper bound (SD3.5's head dim 64 fills half of v5p's 128-deep MXU in q k^T).
    """
    _, chips = topology(topo)
    chip = CHIPS[topo.split(":")[0]]
    n = shape.n_fake_steps
    counted, body = model_flops(shape, chips, k=k)
    counted_na, body_na = model_flops(shape, chips, attention=False, k=k)
    total, rest = counted + (n - 1) * body, counted_na + (n - 1) * body_na
    # Blocks under scan are while loops too: the compiler counts each group's body once. The correction is then
    # the ratio of the model's FLOPs to those the scanned program shows when counted the same way.
    attention, loop = total - rest, rest / (scanned_flops(shape, chips, k) if shape.scan_blocks else counted_na)
    splash = attention / chips if splash_per_chip is None else splash_per_chip
    images = (n + 1) * shape.batch_per_device * chips
    out = {"compiler_flops": compiler_flops, "compiler_seconds": compiler_seconds, "loop_correction": loop,
           "attention_flops": attention, "splash_flops_per_chip": splash, "model_flops": total,
           "flops_per_chip": compiler_flops * loop + splash, "images": images}
    return {**out, **timing(out, chips, chip)}


def timing(row: dict, chips: int, chip: Chip) -> dict:
    """Seconds, images/s and MFU of a row; None where the compiler gives no time (libtpu 0.0.42's v6e cost model
    returns negative `optimal_seconds`)."""
    if not row["compiler_seconds"] > 0:
        return {"seconds": None, "images_per_s": None, "mfu": None}
    seconds = row["compiler_seconds"] * row["loop_correction"] + row["splash_flops_per_chip"] / chip.peak_flops
    return {"seconds": seconds, "images_per_s": row["images"] / seconds,
            "mfu": row["model_flops"] / (chips * chip.peak_flops * seconds)}


def compile_plan(shape: TrainShape, topo: str, hlo_dir: str = "", k: int | None = None) -> dict:
    """Per-chip memory, FLOPs, estimated time and MFU of `shape`'s iteration at scale interval `k` (default: the top
    one) compiled for the slice `topo`."""
    devices, chips = topology(topo)
    if len(devices) != chips:
        raise ValueError(f"{topo}: {len(devices)} devices for {chips} chips; the plan wants one device per chip")
    mesh = sharding.make_mesh((1, len(devices), 1), devices=devices)
    t = time.perf_counter()
    compiled = lower_iteration(shape, mesh, k).compile()
    compile_s = time.perf_counter() - t
    cost, hlo = compiled.cost_analysis(), compiled.as_text()
    if hlo_dir:  # the per-chip program as the TPU compiler left it, to read or recount
        import gzip
        os.makedirs(hlo_dir, exist_ok=True)
        name = (f"{shape.name}-{topo}-b{shape.batch_per_device}-remat_{remat_name(shape)}-{shape.attention_impl}"
                + ("" if k is None else f"-k{k}") + ".hlo.gz").replace(" ", "_")
        with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
            f.write(hlo)
    mem = memory_per_device(compiled)
    del compiled  # the TPU executable's host memory, before the FLOP counts lower the host programs
    t = time.perf_counter()
    fig = figures(shape, topo, float(cost["flops"]), float(cost["optimal_seconds"]), splash_flops(hlo), k)
    return {"model": shape.name, "blocks": depth(shape), "topology": topo, "chips": chips,
            "batch_per_chip": shape.batch_per_device, "remat": remat_name(shape), "attention": shape.attention_impl,
            "blocks_without_remat": shape.blocks_without_remat, "scan_blocks": shape.scan_blocks,
            **mem, "hbm_gib": CHIPS[topo.split(":")[0]].hbm_gib, **fig,
            "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
            "compile_s": compile_s, "flop_count_s": time.perf_counter() - t, "extrapolated": False,
            **({} if k is None else {"interval": k})}


def remat_name(shape: TrainShape) -> str:
    return shape.remat_policy if shape.remat else "off"


LINEAR = ("arguments_gib", "outputs_gib", "temp_gib", "alias_gib", "peak_gib", "flops_per_chip", "model_flops",
          "attention_flops", "compiler_flops", "compiler_seconds", "splash_flops_per_chip")


def _f(x: float | None, width: int, digits: int) -> str:
    """x formatted, or '-' where there is no figure."""
    return f"{'-':>{width}s}" if x is None else f"{x:{width}.{digits}f}"


def _line(x0, y0, x1, y1, x):
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def extrapolate(rows: list[dict], full_blocks: int) -> list[dict]:
    """Full-depth rows from the two deepest compiled cuts of each batch: every size and time linear in the block
    count. Shallower cuts stay in the plan as measurements; 1-block cuts do not follow the line (batch slopes
    that shrink with depth, peaks that fall with it)."""
    out = []
    for b in sorted({r["batch_per_chip"] for r in rows}):
        at = sorted((r for r in rows if r["batch_per_chip"] == b), key=lambda r: r["blocks"])
        if len(at) < 2 or at[-1]["blocks"] == full_blocks:
            continue
        r0, r1 = at[-2], at[-1]
        if r1["peak_gib"] < r0["peak_gib"]:  # seen at 4 images/chip: 1 -> 2 blocks, 6.5 -> 6.2 GiB; no line
            print(f"no depth extrapolation at {b} images/chip: the peak falls with depth "
                  f"({r0['peak_gib']:.1f} GiB at {r0['blocks']} blocks, {r1['peak_gib']:.1f} at {r1['blocks']})")
            continue
        row = {**r1, "blocks": full_blocks, "extrapolated": True, "compile_s": None,
               "model": r1["model"].split("[")[0]}
        for k in (k for k in LINEAR if k in r0 and k in r1):
            row[k] = _line(r0["blocks"], r0[k], r1["blocks"], r1[k], full_blocks)
        # cuts keep the fraction: 1 of 4, 2 of 8 -> 6 of 24 (rows compiled before the field have none: 0)
        row["blocks_without_remat"] = round(_line(r0["blocks"], r0.get("blocks_without_remat", 0), r1["blocks"],
                                                  r1.get("blocks_without_remat", 0), full_blocks))
        row.update(timing(row, row["chips"], CHIPS[row["topology"].split(":")[0]]))
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
              f"{r['flops_per_chip'] / 1e12:10.1f} {_f(r['seconds'], 7, 3)} {_f(r['images_per_s'], 6, 1)} "
              f"{_f(r['mfu'], 5, 2)}")
    print("GiB per chip; * extrapolated linearly in depth from the cut models above")


def variant(r: dict) -> str:
    """A row's or plan's remat policy, with ', fused bwd' for the splash_fused attention and the blocks without
    remat."""
    n = r.get("blocks_without_remat", 0)
    return (r.get("remat", "full") + (", fused bwd" if r.get("attention") == "splash_fused" else "")
            + (f", {n} blocks without" if n else ""))


def markdown(plans: dict) -> str:
    """Every plan of a plan file as one markdown table (compiled cut-depth rows, then the full-depth rows, then the
    scale intervals below the top compiled at full depth)."""
    out = ["| model | topology | remat | blocks | images/chip | arguments | temporaries | peak GiB/chip (HBM) | "
           "TFLOP/chip | s/iteration (≥) | images/s | MFU (≤) | compile |", "|" + "---|" * 13]
    for key, plan in sorted(plans.items()):
        for r in (sorted(plan["rows"], key=lambda r: (r["extrapolated"], r["batch_per_chip"], r["blocks"]))
                  + sorted(plan.get("interval_rows", []), key=lambda r: (r["batch_per_chip"], r["interval"]))):
            blocks = f"**{r['blocks']}, extrapolated**" if r["extrapolated"] else str(r["blocks"])
            blocks += f", latents {r['latent']}" if "interval" in r else ""
            out.append(f"| {r['model']} | {r['topology']} | {variant(r)} | {blocks} | "
                       f"{r['batch_per_chip']} | {r['arguments_gib']:.2f} | {r['temp_gib']:.1f} | "
                       f"{r['peak_gib']:.1f} ({r['hbm_gib']:.0f}) | {r['flops_per_chip'] / 1e12:.0f} | "
                       f"{_f(r['seconds'], 0, 3)} | {_f(r['images_per_s'], 0, 1)} | {_f(r['mfu'], 0, 2)} | "
                       + (f"{r['compile_s']:.0f} s |" if r.get("compile_s") else "- |"))
        fit, safe = plan["max_batch_per_chip"], plan["max_batch_per_chip_10pct_headroom"]
        bound = " (only this batch compiled: a lower bound)" if plan.get("max_batch_is_lower_bound") else ""
        verdict = f"largest batch/chip that fits: {fit}, with 10 % headroom: {safe}{bound}"
        if not has_full_depth(plan):
            verdict = "no full-depth figure: one depth compiled"
        out.append(f"| {plan['model']} | {plan['topology']} | {variant(plan)} | {verdict} |" + " |" * 9)
    return "\n".join(out)


def plan_key(model: str, topo: str, remat: str = "full", attention: str = "splash", without_remat: int = 0) -> str:
    """The plan file's key: 'medium@v5p:2x2x1', with '/remat=dots' for a policy other than the default,
    '/attention=splash_fused' for the fused-backward kernel and '/blocks_without_remat=6'."""
    return f"{model}@{topo}" + variant_suffix(remat, attention, without_remat)


def save_plan(path: str, key: str, summarise) -> dict:
    """Set `key` in the plan file to `summarise(compiled rows)`, the rows ours merged with those the file holds
    for `key` now (another run of the same variant, e.g. another depth, may have written meanwhile; ours win);
    other keys are kept. Locked, atomic; returns the plan written."""
    import fcntl
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        plans = {}
        if os.path.exists(path):
            with open(path) as f:
                plans = json.load(f)
        plan = summarise(plans.get(key, {}).get("rows", []))
        old = plans.get(key, {})
        for field in ("interval_seconds", "interval_compiled"):  # per batch: stay until replaced
            if old.get(field):
                plan[field] = {**old[field], **plan.get(field, {})}
        ours = {(r["interval"], r["batch_per_chip"]) for r in plan.get("interval_rows", [])}
        irows = [r for r in old.get("interval_rows", []) if (r["interval"], r["batch_per_chip"]) not in ours]
        if irows or plan.get("interval_rows"):  # compiled scale intervals below the top (--intervals compile)
            plan["interval_rows"] = irows + plan.get("interval_rows", [])
        plans[key] = plan
        with open(path + ".tmp", "w") as f:
            json.dump(dict(sorted(plans.items())), f, indent=1)
        os.replace(path + ".tmp", path)
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="medium", choices=sorted(SHAPES))
    ap.add_argument("--topology", default="v5p:2x2x1", help="e.g. v5p:2x2x1, v5p:2x2x2, v6e:2x2, v4:2x2x1")
    ap.add_argument("--batch", default="", help="comma-separated per-chip batches (default: the reference)")
    ap.add_argument("--blocks", default="", help="comma-separated depths to compile (default: the full model)")
    ap.add_argument("--remat", default="full", choices=sorted(REMAT),
                    help="model.remat / model.remat_policy: off, or a policy (full, the default; attention; dots; "
                    "dots_attention)")
    ap.add_argument("--attention", default="splash", choices=SPLASH_IMPLS,
                    help="model.attention_impl: splash, or splash_fused (the kernel's fused backward)")
    ap.add_argument("--blocks-without-remat", type=int, default=0, metavar="N",
                    help="model.blocks_without_remat at full depth (cut depths keep the fraction)")
    ap.add_argument("--unroll", action="store_true",
                    help="model.scan_blocks=False: every block unrolled (the program before scan; slow to compile)")
    ap.add_argument("--intervals", nargs="?", const="estimate", default="", choices=("estimate", "compile"),
                    help="also every scale interval's seconds and the run's wall time, which launch/plan_check.py "
                    "prints: estimated by FLOPs from the top interval (the default), or 'compile': every interval "
                    "below the top compiled at full depth (kept in the plan's interval_rows)")
    ap.add_argument("--at-intervals", default="", metavar="K,..", help="with --intervals compile: compile only "
                    "these scale intervals, 0 the smallest (e.g. 0,1 for a variant whose larger ones do not fit); "
                    "the top interval's row only if listed")
    ap.add_argument("--hlo-dir", default="", help="write each compiled program's HLO text (gzip) here")
    ap.add_argument("--json", default="", help="rows are kept in (and reused from) this file; launch/tpu_pod.sh "
                    "reads benchmarks/tpu_plan.json")
    ap.add_argument("--no-compile", action="store_true", help="only re-summarise the rows already in --json")
    ap.add_argument("--table", action="store_true", help="print the --json file's plans as a markdown table, "
                    "compile nothing")
    a = ap.parse_args(argv)
    if a.table:
        with open(a.json) as f:
            print(markdown(json.load(f)))
        return
    shape = dataclasses.replace(SHAPES[a.model], scan_blocks=not a.unroll)
    batches = [int(b) for b in a.batch.split(",")] if a.batch else [shape.batch_per_device]
    depths = [int(n) for n in a.blocks.split(",")] if a.blocks else [None]
    full, hbm = depth(shape), CHIPS[a.topology.split(":")[0]].hbm_gib
    key = plan_key(a.model, a.topology, a.remat, a.attention, a.blocks_without_remat) + ("/unroll" if a.unroll else "")
    plans = {}
    if a.json and os.path.exists(a.json):
        with open(a.json) as f:
            plans = json.load(f)
    rows = [r for r in plans.get(key, {}).get("rows", []) if not r["extrapolated"]]  # compiled before: reused
    for r in rows:  # recounted with this version's timing (rows from before it had no "images")
        r.setdefault("images", (shape.n_fake_steps + 1) * r["batch_per_chip"] * r["chips"])
        r.update(timing(r, r["chips"], CHIPS[a.topology.split(":")[0]]))
    without = f", {a.blocks_without_remat} blocks without remat" if a.blocks_without_remat else ""
    for n in depths:
        for b in batches:
            s = cut(shape, n, b, a.remat, a.attention, a.blocks_without_remat)
            if any((r["blocks"], r["batch_per_chip"]) == (depth(s), b) for r in rows):
                print(f"{s.name} on {a.topology}, {b} images/chip, remat {a.remat}, {a.attention}{without}: in {a.json} already", flush=True)
                continue
            if a.no_compile or not compiles(a, build_models(shape).schedule.num_intervals - 1):
                print(f"{s.name} on {a.topology}, {b} images/chip, remat {a.remat}, {a.attention}{without}: not in {a.json}", flush=True)
                continue
            print(f"{s.name} on {a.topology}, {b} images/chip, remat {a.remat}, {a.attention}{without}: compiling ...", flush=True)
            r = fitting(lambda: compile_plan(s, a.topology, a.hlo_dir), hbm)
            if r is None:
                continue
            rows.append(r)
            print(f"  {r['compile_s']:.0f} s: peak {r['peak_gib']:.1f} GiB/chip (arguments {r['arguments_gib']:.2f}, "
                  f"temporaries {r['temp_gib']:.1f}), {_f(r['seconds'], 0, 3)} s/iteration, MFU {_f(r['mfu'], 0, 2)}",
                  flush=True)
            if a.json:  # written after every compile: a long run keeps what it measured
                save_plan(a.json, key, lambda saved: _summary(a, shape, merge_rows(saved, rows), full, hbm))
    estimate, compiled_at, irows = intervals(a, shape, key, plans.get(key, {}).get("interval_rows", []), rows,
                                             batches, full, hbm)

    def summarise(saved):
        out = _summary(a, shape, merge_rows(saved, rows), full, hbm)
        out["interval_seconds"], out["interval_compiled"] = estimate, compiled_at
        if irows:
            out["interval_rows"] = irows
        return out

    summary = _summary(a, shape, rows, full, hbm)
    if a.json:
        summary = save_plan(a.json, key, summarise)
    _print(sorted(summary["rows"], key=lambda r: (r["blocks"], r["batch_per_chip"])))
    print(f"largest batch/chip that fits {hbm:.0f} GiB: {summary['max_batch_per_chip']} "
          f"(with {HEADROOM:.0%} headroom: {summary['max_batch_per_chip_10pct_headroom']})")


def intervals(a, shape: TrainShape, key: str, irows: list[dict], rows: list[dict], batches: list[int], full: int,
              hbm: float) -> tuple[dict, dict, list[dict]]:
    """Seconds per iteration at every scale interval, per batch ({batch: [s, ...]}), which of them were compiled
    ({batch: [bool, ...]}) and the compiled rows of the intervals below the top (those kept, then ours). The top
    interval's seconds: its full-depth row (compiled or extrapolated). `--intervals compile` compiles each interval
    below it at full depth; else they are estimated from the top by FLOPs (`interval_seconds`, a lower bound)."""
    estimate, compiled_at, irows = {}, {}, list(irows)
    if not a.intervals:
        return estimate, compiled_at, irows
    top = {r["batch_per_chip"]: r for r in _summary(a, shape, rows, full, hbm)["rows"] if r["blocks"] == full}
    schedule = build_models(shape).schedule
    K = schedule.num_intervals
    for b in batches:
        s, t = cut(shape, None, b, a.remat, a.attention, a.blocks_without_remat), top.get(b)
        if a.intervals == "estimate":
            if t and t["seconds"]:
                estimate[str(b)] = interval_seconds(s, t["seconds"])
                compiled_at[str(b)] = [False] * (K - 1) + [not t["extrapolated"]]
        else:
            for k in (k for k in range(K - 1) if compiles(a, k)):
                what = f"{s.name} on {a.topology}, {b} images/chip, remat {a.remat}, {a.attention}, interval {k} " \
                       f"(latents {schedule.scale(k)})"
                if any((r["interval"], r["batch_per_chip"]) == (k, b) for r in irows):
                    print(f"{what}: in {a.json} already", flush=True)
                    continue
                print(f"{what}: compiling ...", flush=True)
                r = fitting(lambda: compile_plan(s, a.topology, a.hlo_dir, k), hbm)
                if r is None:
                    continue
                irows.append({**r, "latent": schedule.scale(k)})
                r = irows[-1]
                print(f"  {r['compile_s']:.0f} s (FLOP counts {r['flop_count_s']:.0f} s): peak {r['peak_gib']:.1f} "
                      f"GiB/chip ({'fits' if r['peak_gib'] <= hbm * (1 - HEADROOM) else 'does not fit'} with "
                      f"{HEADROOM:.0%} headroom), {_f(r['seconds'], 0, 3)} s/iteration, MFU {_f(r['mfu'], 0, 2)}",
                      flush=True)
                if a.json:
                    save_plan(a.json, key, lambda saved: {**_summary(a, shape, merge_rows(saved, rows), full, hbm),
                                                          "interval_rows": irows})
            at = {r["interval"]: r["seconds"] for r in irows if r["batch_per_chip"] == b}
            secs = [at.get(k) for k in range(K - 1)] + [t["seconds"] if t else None]
            if None not in secs:
                estimate[str(b)] = secs
                compiled_at[str(b)] = [True] * (K - 1) + [not t["extrapolated"]]
        if str(b) in estimate:
            how = ("compiled" if all(compiled_at[str(b)]) else "top " + ("compiled" if compiled_at[str(b)][-1]
                   else "extrapolated") + (", the others compiled" if a.intervals == "compile" else
                                           ", the others estimated by FLOPs: a lower bound"))
            print(f"{b} images/chip: s/iteration per interval {', '.join(f'{x:.2f}' for x in estimate[str(b)])} "
                  f"({how}); 3000 iterations {run_hours(estimate[str(b)], 3000):.1f} h (compiles not included)")
    return estimate, compiled_at, irows


def fitting(compile_row, hbm: float) -> dict | None:
    """`compile_row()`, or None (said in one line) where the TPU compiler refuses a program too big for HBM."""
    try:
        return compile_row()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"RESOURCE_EXHAUSTED: .*?required for HLO temporaries \(([\d.]+)G\)", str(e))
        if not need:
            raise
        print(f"  does not fit: {need.group(1)} GiB of temporaries per chip (HBM {hbm:.0f} GiB)", flush=True)
        return None


def compiles(a, k: int) -> bool:
    """Whether this run compiles scale interval k (--at-intervals; every one by default)."""
    return not a.at_intervals or k in {int(x) for x in a.at_intervals.split(",")}


def merge_rows(saved: list[dict], ours: list[dict]) -> list[dict]:
    """The compiled rows of both, one per (blocks, batch): ours where both have one."""
    at = lambda r: (r["blocks"], r["batch_per_chip"])
    mine = {at(r) for r in ours}
    return [r for r in saved if not r["extrapolated"] and at(r) not in mine] + list(ours)


def _gib_per_image(rows: list[dict]) -> float:
    """Peak GiB per image through the two largest batches of `rows` (one depth)."""
    r0, r1 = sorted(rows, key=lambda r: r["batch_per_chip"])[-2:]
    return (r1["peak_gib"] - r0["peak_gib"]) / (r1["batch_per_chip"] - r0["batch_per_chip"])


def batch_rows(rows: list[dict], full: int) -> list[dict]:
    """The full-depth rows a largest batch may be read from. A depth-extrapolated batch slope below the deepest
    compiled cut's (more blocks keep less per image: seen with 1-/2-block cuts) is not believed: then only the
    smallest batch counts, a lower bound."""
    final = [r for r in rows if r["blocks"] == full]
    cuts = [r for r in rows if not r["extrapolated"]]
    deepest = [r for r in cuts if r["blocks"] == max((c["blocks"] for c in cuts), default=0)]
    if (len({r["batch_per_chip"] for r in final}) < 2 or not all(r["extrapolated"] for r in final)
            or len({r["batch_per_chip"] for r in deepest}) < 2 or _gib_per_image(final) >= _gib_per_image(deepest)):
        return final
    print(f"the full-depth peak grows {_gib_per_image(final):.2f} GiB per image, less than the "
          f"{deepest[0]['blocks']}-block cut's {_gib_per_image(deepest):.2f}: no largest batch from that slope "
          "(compile deeper cuts); the smallest batch is a lower bound")
    return [min(final, key=lambda r: r["batch_per_chip"])]


def _summary(a, shape: TrainShape, rows: list[dict], full: int, hbm: float) -> dict:
    rows = rows + extrapolate(rows, full)
    final = batch_rows(rows, full)
    return {"model": shape.name, "topology": a.topology, "remat": a.remat, "attention": a.attention,
            "blocks_without_remat": a.blocks_without_remat, "hbm_gib": hbm, "full_blocks": full,
            "max_batch_per_chip": largest_batch(final, hbm),
            "max_batch_per_chip_10pct_headroom": largest_batch(final, hbm, HEADROOM),
            "max_batch_is_lower_bound": len({r["batch_per_chip"] for r in final}) < 2,  # one batch measured
            "extrapolated": any(r["extrapolated"] for r in final), "rows": rows}


if __name__ == "__main__":
    main()
