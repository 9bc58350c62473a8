"""Before a TPU launch: print the TPU plan's batch recommendation for the slice, refuse a batch it says won't fit.

    python3 launch/plan_check.py ACCELERATOR CONFIG [--force-batch] [--config.x=y ...]
    e.g. python3 launch/plan_check.py v5p-16 configs/sd35_medium.py --config.train.batch_size=128

Reads benchmarks/tpu_plan.json (written by `python -m benchmarks.tpu_plan --json ...`); standard library only,
so it runs on the machine that launches, with or without jax. Exit 1: the per-chip batch exceeds the largest the
plan fits in HBM (override with --force-batch); exit 0 otherwise, also when the plan has no entry for the slice
or measured a single batch that fits (then a larger batch is unverified, not refused).

A generation job (`swd-generate --sampler teacher --shard-size ...`, the teacher's training set):

    python3 launch/plan_check.py ACCELERATOR --generate MODEL [--batch-per-device N] [--images 200000] [--force-batch]
    e.g. python3 launch/plan_check.py v5p-16 --generate sd35_medium --batch-per-device 4

reads benchmarks/tpu_sampling_plan.json (`python -m benchmarks.tpu_sampling_plan`): prints the largest batch per
chip, images/s per chip and the hours for the set on this slice; exit 1 when N exceeds the largest batch.
"""
from __future__ import annotations

import json
import os
import re
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PLAN = os.path.join(REPO, "benchmarks", "tpu_plan.json")
CORES_PER_CHIP = {"v5p": 2, "v4": 2, "v6e": 1, "v5e": 1}  # v5p and v4 names count TensorCores (v5p-16 = 8 chips)
GENERATIONS = {"v5litepod": "v5e"}  # accelerator-type prefix -> the plan's generation name
MODELS = {"sd35_medium": "medium", "sd35_large": "large", "flux_dev": "flux"}


def config_value(config: str, overrides: list[str], field: str, pattern: str) -> str | None:
    """`--config.FIELD=VALUE` from the overrides, else the config file's assignment, else configs/common.py's."""
    section, name = field.split(".")
    for o in reversed(overrides):
        m = re.fullmatch(rf"--config\.{section}\.{name}=({pattern})", o)
        if m:
            return m.group(1)
    for path in (config, os.path.join(os.path.dirname(config), "common.py")):
        with open(path) as f:  # the code only: not the docstring, not comments
            code = re.sub(r"#.*", "", re.sub(r'^\s*("""|\'\'\').*?\1', "", f.read(), count=1, flags=re.S))
        m = re.search(rf"\b{name}\s*=\s*[\"']?({pattern})", code)
        if m:
            return m.group(1)
    return None


def global_batch(config: str, overrides: list[str]) -> int:
    """train.batch_size from the overrides, else the config file's assignment, else configs/common.py's."""
    batch = config_value(config, overrides, "train.batch_size", r"\d+")
    if batch is None:
        raise SystemExit(f"plan check: no train.batch_size in {config} or its common.py")
    return int(batch)


def remat_of(config: str, overrides: list[str]) -> str:
    """The plan's remat variant of the run: 'off' (model.remat False), else model.remat_policy ('full')."""
    if config_value(config, overrides, "model.remat", r"True|False|true|false|0|1") in ("False", "false", "0"):
        return "off"
    return config_value(config, overrides, "model.remat_policy", r"\w+") or "full"


def attention_of(overrides: list[str]) -> str:
    """The run's splash kernel: tpu_pod.sh sets attention_impl=splash unless the overrides pick splash_fused."""
    for o in reversed(overrides):
        m = re.fullmatch(r"--config\.model\.attention_impl=(\w+)", o)
        if m:
            return m.group(1)
    return "splash"


REMAT_FLAGS = {"full": "", "attention": "--config.model.remat_policy=attention",
               "dots": "--config.model.remat_policy=dots",
               "dots_attention": "--config.model.remat_policy=dots_attention", "off": "--config.model.remat=False"}
ATTENTION_FLAGS = {"splash": "", "splash_fused": "--config.model.attention_impl=splash_fused"}


def variant_suffix(remat: str, attention: str, without: int = 0) -> str:
    """The plan key's suffix after 'model@topology' (as benchmarks.tpu_plan.plan_key writes it)."""
    return (("" if remat == "full" else f"/remat={remat}") + ("" if attention == "splash" else f"/attention={attention}")
            + (f"/blocks_without_remat={without}" if without else ""))


def parse_variant(key: str) -> tuple[str, str, int]:
    """(remat, attention, blocks without remat) of a plan key: the inverse of variant_suffix."""
    parts = dict(p.split("=", 1) for p in key.split("/")[1:])
    return parts.get("remat", "full"), parts.get("attention", "splash"), int(parts.get("blocks_without_remat", 0))


def variant_flags(remat: str, attention: str, without: int) -> str:
    return " ".join(f for f in (REMAT_FLAGS[remat], ATTENTION_FLAGS[attention],
                                f"--config.model.blocks_without_remat={without}" if without else "") if f)


def has_full_depth(plan: dict) -> bool:
    """Whether the plan holds a full-depth row (compiled or extrapolated); one compiled cut depth gives none."""
    return any(r["blocks"] == plan.get("full_blocks", r["blocks"]) for r in plan["rows"])


def variant_plans(plans: dict, model: str, gen: str, suffix: str) -> list[dict]:
    """The plans of `model` on generation `gen` (every slice) of the variant whose key ends in `suffix`."""
    return [p for key, p in plans.items()
            if key.startswith(f"{model}@{gen}:") and key[len(key.split("/")[0]):] == suffix]


def chips_of(plan: dict) -> int:
    return max(r["chips"] for r in plan["rows"])


def pick_plan(plans: dict, model: str, gen: str, remat: str, chips: int, attention: str = "splash",
              without: int = 0) -> dict | None:
    """The plan of `model` on generation `gen` with that variant closest to a slice of `chips` chips."""
    same = [p for p in variant_plans(plans, model, gen, variant_suffix(remat, attention, without)) if has_full_depth(p)]
    if not same:
        return None
    # Per-chip memory shrinks a little with more chips (sharded state): the plan of the largest slice not
    # bigger than this one is the conservative one; else the smallest planned.
    smaller = [p for p in same if chips_of(p) <= chips]
    return max(smaller, key=chips_of) if smaller else min(same, key=chips_of)


def covering_plan(plans: dict, model: str, gen: str, suffix: str, chips: int, per_chip: float, plan: dict) -> dict:
    """`plan`, or where it compiled only batches below `per_chip` (its largest batch a lower bound), the plan of the
    same variant on a smaller slice that measured where the largest batch lies: per-chip memory shrinks a little
    with more chips, so that plan's verdict is the conservative one."""
    best = plan["max_batch_per_chip"]
    if not plan.get("max_batch_is_lower_bound") or best is None or per_chip <= best:
        return plan
    measured = [p for p in variant_plans(plans, model, gen, suffix)
                if has_full_depth(p) and not p.get("max_batch_is_lower_bound") and chips_of(p) <= chips]
    if not measured:
        return plan
    other = max(measured, key=chips_of)
    print(f"plan check: the {plan['topology']} plan compiled only up to {best} images/chip; checking {per_chip:g} "
          f"against the {other['topology']} plan, which measured larger batches (per-chip memory shrinks a little "
          "with more chips: the conservative verdict)")
    return other


def _full_depth_mfu(plan: dict, per_chip: float) -> float | None:
    full = max(r["blocks"] for r in plan["rows"])
    rows = sorted((r for r in plan["rows"] if r["blocks"] == full), key=lambda r: abs(r["batch_per_chip"] - per_chip))
    return rows[0]["mfu"] if rows else None


def suggest_variant(plans: dict, model: str, gen: str, chips: int, per_chip: float, variant: tuple[str, str, int],
                    plan: dict) -> None:
    """Print the (remat, attention, blocks without remat) variant the plan says is fastest among those that fit
    this batch with 10 % headroom."""
    ours = _full_depth_mfu(plan, per_chip)
    options = []
    planned = {parse_variant(k) for k in plans if k.startswith(f"{model}@{gen}:")}
    for other in sorted(v for v in planned if v[0] in REMAT_FLAGS and v[1] in ATTENTION_FLAGS):
        p = pick_plan(plans, model, gen, other[0], chips, other[1], other[2])
        safe = p and p["max_batch_per_chip_10pct_headroom"]
        if other != variant and safe and per_chip <= safe:
            mfu = _full_depth_mfu(p, per_chip)
            if mfu is not None and ours is not None and mfu > ours:
                options.append((mfu, other))
    if options:
        mfu, (remat, attention, without) = max(options)
        name = (f"remat {remat}" + (f" with {attention}" if attention != "splash" else "")
                + (f" and {without} blocks without remat" if without else ""))
        flags = variant_flags(remat, attention, without)
        print(f"plan check: {name} fits this batch with 10 % headroom and is faster (estimated MFU {mfu:.2f} "
              f"vs {ours:.2f}): add {flags}")


def compiled_intervals(plan: dict) -> dict:
    """{batch: True} where every scale interval's seconds in the plan come from a compile (`benchmarks.tpu_plan
    --intervals compile`), not from the top interval's FLOP share."""
    return {b: all(c) for b, c in (plan.get("interval_compiled") or {}).items()}


def print_run_time(plan: dict, per_chip: float, steps: int, others: list[dict] = ()) -> float | None:
    """Print (and return) the run's estimated hours: iteration `step` trains interval step mod K, each interval's
    seconds from the plan's `interval_seconds` (`benchmarks.tpu_plan --intervals`) at the nearest planned batch,
    scaled by the batch ratio; compiles not included. Where the plan only estimates the smaller intervals and one of
    `others` (the same variant on another slice of the generation) compiled them all, that plan's figure is used:
    s/iteration at a per-chip batch barely depends on the chip count (SD3.5-M at 8/chip: 15.09 s compiled on 4
    chips, 15.17 extrapolated on 8)."""
    if not any(compiled_intervals(plan).values()):
        plan = next((p for p in others if any(compiled_intervals(p).values())), plan)
    estimates = plan.get("interval_seconds") or {}
    if not estimates or steps <= 0:
        print("  run time: no per-interval estimate in the plan (python -m benchmarks.tpu_plan ... --intervals)")
        return None
    compiled = compiled_intervals(plan)
    b = min(estimates, key=lambda x: (not compiled.get(x, False), abs(int(x) - per_chip)))
    secs = [s * per_chip / int(b) for s in estimates[b]]
    K = len(secs)
    hours = sum(len(range(k, steps, K)) * s for k, s in enumerate(secs)) / 3600
    scaled = "" if int(b) == per_chip else f", scaled from {b} images/chip"
    how = (f"; every interval compiled on {plan['topology']}" if compiled.get(b) else
           "; intervals below the top estimated by FLOPs: a lower bound" if b in compiled else "")
    print(f"  run time: {steps} iterations ~ {hours:.1f} h (s/iteration per scale interval "
          f"{', '.join(f'{s:.1f}' for s in secs)}{scaled}; compiles not included{how})")
    return hours


SAMPLING_PLAN = os.path.join(REPO, "benchmarks", "tpu_sampling_plan.json")
SAMPLING_MODELS = {**MODELS, "medium": "medium", "large": "large", "flux": "flux"}


def _option(rest: list[str], name: str, default: str | None = None) -> str | None:
    """`--name VALUE` or `--name=VALUE` from the arguments."""
    for i, o in enumerate(rest):
        if o == name and i + 1 < len(rest):
            return rest[i + 1]
        if o.startswith(name + "="):
            return o.split("=", 1)[1]
    return default


def check_generation(accel: str, rest: list[str]) -> int:
    """The sampling plan of the teacher on this slice: its figures, and a refusal of a batch it says won't fit."""
    name = _option(rest, "--generate") or ""
    model = SAMPLING_MODELS.get(os.path.basename(name).removesuffix(".py"))
    gen, _, n = accel.partition("-")
    gen = GENERATIONS.get(gen, gen)
    if gen not in CORES_PER_CHIP or not n.isdigit() or model is None:
        print(f"plan check: no TPU sampling plan for {name or '?'} on {accel}; launching without a batch check")
        return 0
    chips = max(1, int(n) // CORES_PER_CHIP[gen])
    plans = {}
    if os.path.exists(SAMPLING_PLAN):
        with open(SAMPLING_PLAN) as f:
            plans = json.load(f)
    same = [p for key, p in plans.items() if key.startswith(f"{model}@{gen}:") and "/" not in key
            and has_full_depth(p)]
    if not same:
        print(f"plan check: {SAMPLING_PLAN} has no {model} plan for {gen}; launching without a batch check")
        return 0
    plan = same[0]
    images = int(_option(rest, "--images", "200000"))
    best, safe = plan["max_batch_per_chip"], plan["max_batch_per_chip_10pct_headroom"]
    note = " (extrapolated from cut-depth compiles)" if plan.get("extrapolated") else ""
    print(f"TPU sampling plan for {plan['model']} on {plan['topology']}{note}: {plan['steps']} Euler steps at latent "
          f"{plan['latent']}{' with CFG' if plan.get('cfg') else ''}, {plan['attention']} attention, HBM "
          f"{plan['hbm_gib']:.0f} GiB/chip:")
    print(f"  {'batch/chip':>10s} {'peak GiB':>9s} {'s/step':>7s} {'images/s/chip':>13s} {'hours':>7s}")
    fig = lambda x, w, d: f"{'-':>{w}s}" if x is None else f"{x:{w}.{d}f}"
    for r in sorted((r for r in plan["rows"] if r["blocks"] == plan["full_blocks"]), key=lambda r: r["batch_per_chip"]):
        ips = r.get("images_per_s_per_chip")
        hours = images / (chips * ips) / 3600 if ips else None
        print(f"  {r['batch_per_chip']:10d} {r['peak_gib']:9.1f} {fig(r['step_seconds'], 7, 3)} {fig(ips, 13, 3)} "
              f"{fig(hours, 7, 1)}")
    print(f"  largest batch/chip that fits: {best}; with 10 % headroom: {safe}; hours: {images} images on {accel} "
          f"({chips} chips)")
    per_chip = _option(rest, "--batch-per-device")
    if per_chip is None:
        compiled = max(r["batch_per_chip"] for r in plan["rows"] if r["blocks"] == plan["full_blocks"])
        print(f"this launch: {min(compiled, safe or compiled)} images/chip, the largest batch the plan compiled "
              "(swd-generate's default on a TPU; --batch-per-device N for more)")
        return 0
    per_chip = int(per_chip)
    print(f"this launch: {per_chip} images/chip")
    if best is not None and per_chip <= best:
        return 0
    if best is not None and plan.get("max_batch_is_lower_bound"):
        print(f"plan check: the plan covers only {best} images/chip (it fits); {per_chip} is unverified, launching")
        return 0
    if "--force-batch" in rest:
        print("plan check: the plan says this batch does not fit; --force-batch given, launching anyway")
        return 0
    print(f"plan check: {per_chip} images/chip does not fit ({best or 'no batch'} does); lower --batch-per-device "
          "or pass --force-batch")
    return 1


def main(argv: list[str]) -> int:
    if any(a == "--generate" or a.startswith("--generate=") for a in argv[1:]):
        return check_generation(argv[0], argv[1:])
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1])
        return 2
    accel, config, rest = argv[0], argv[1], argv[2:]
    if not os.path.exists(config):  # a shipped config by name, as swd-train takes it: sd35_medium
        config = os.path.join(REPO, "configs", os.path.basename(config).removesuffix(".py") + ".py")
    force = "--force-batch" in rest
    gen, _, n = accel.partition("-")
    gen = GENERATIONS.get(gen, gen)
    model = MODELS.get(os.path.splitext(os.path.basename(config))[0])
    if gen not in CORES_PER_CHIP or not n.isdigit() or model is None:
        print(f"plan check: no TPU plan for {model or config} on {accel}; launching without a batch check")
        return 0
    chips = max(1, int(n) // CORES_PER_CHIP[gen])
    batch = global_batch(config, rest)
    per_chip = batch / chips
    plans = {}
    if os.path.exists(PLAN):
        with open(PLAN) as f:
            plans = json.load(f)
    remat, attention = remat_of(config, rest), attention_of(rest)
    without = int(config_value(config, rest, "model.blocks_without_remat", r"\d+") or 0)
    if attention not in ATTENTION_FLAGS:
        print(f"plan check: no TPU plan for attention_impl={attention}; launching without a batch check")
        return 0
    plan = pick_plan(plans, model, gen, remat, chips, attention, without)
    name = (f"remat {remat}" + (f", {attention}" if attention != "splash" else "")
            + (f", {without} blocks without remat" if without else ""))
    if plan is None:
        print(f"plan check: {PLAN} has no {model} plan for {gen} with {name}; launching without a batch check")
        return 0
    suffix = variant_suffix(remat, attention, without)
    plan = covering_plan(plans, model, gen, suffix, chips, per_chip, plan)
    best, safe = plan["max_batch_per_chip"], plan["max_batch_per_chip_10pct_headroom"]
    note = " (extrapolated from cut-depth compiles)" if plan.get("extrapolated") else ""
    print(f"TPU plan for {plan['model']} on {plan['topology']}, {name}{note}, HBM {plan['hbm_gib']:.0f} "
          "GiB/chip:")
    print(f"  {'batch/chip':>10s} {'peak GiB':>9s} {'s/iter':>7s} {'MFU':>5s}")
    full = max(r["blocks"] for r in plan["rows"])
    fig = lambda x, w, d: f"{'-':>{w}s}" if x is None else f"{x:{w}.{d}f}"  # v6e/v4: the compiler gives no time
    for r in sorted((r for r in plan["rows"] if r["blocks"] == full), key=lambda r: r["batch_per_chip"]):
        print(f"  {r['batch_per_chip']:10d} {r['peak_gib']:9.1f} {fig(r['seconds'], 7, 3)} {fig(r['mfu'], 5, 2)}")
    print(f"  largest batch/chip that fits: {best}; with 10 % headroom: {safe}")
    print(f"this launch: global batch {batch} on {accel} ({chips} chips) = {per_chip:g} images/chip")
    others = sorted((p for p in variant_plans(plans, model, gen, suffix) if p is not plan), key=lambda p: -chips_of(p))
    print_run_time(plan, per_chip, int(config_value(config, rest, "train.steps", r"\d+") or 0), others)
    if not any(o.startswith(("--config.model.remat=", "--config.model.remat_policy=", "--config.model.attention_impl=",
                             "--config.model.blocks_without_remat=")) for o in rest):
        suggest_variant(plans, model, gen, chips, per_chip, (remat, attention, without), plan)
    if best is not None and per_chip <= best:
        return 0
    if best is not None and plan.get("max_batch_is_lower_bound"):
        print(f"plan check: the plan covers only {best} images/chip at full depth (it fits); {per_chip:g} is "
              "unverified, launching")
        return 0
    if force:
        print("plan check: the plan says this batch does not fit; --force-batch given, launching anyway")
        return 0
    print(f"plan check: {per_chip:g} images/chip does not fit ({best or 'no batch'} does); lower "
          "--config.train.batch_size or pass --force-batch")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
