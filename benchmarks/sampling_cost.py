"""Sampling cost: SwD 4- and 6-step vs full-resolution 4-step vs the 28-step teacher (CFG), per image.

    python -m benchmarks.sampling_cost [--repeats 5] [--skip-wall] [--skip-flops] [--json out.json]

FLOPs: XLA's cost analysis of the sampler's own step programs (`swd_jax.method.sampler._scale_step` /
`_euler_step`: transformer + bicubic upscale + renoise, CFG as one doubled batch) lowered on abstract
inputs at the published SD3.5-Medium and -Large shapes (bf16, 333 text tokens, batch 1, 1024 px = latent
128); no weights are needed. The student's LoRA is counted as merged into the base weights.
Wall time: the same samplers run on the tiny SD3.5-Medium-shaped model of `benchmarks/tiny.py` on CPU, all
scales halved (latent 64 = full resolution there), batch 1, fp32; after a warm-up run of each, the samplers
take turns `--repeats` times (the 28-step teacher only the first 2 turns) and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.abstract_train import SD35_TEXT_TOKENS
from benchmarks.tiny import TINY_SD35M, TinyShape, random_uncond
from swd_jax.method import sampler
from swd_jax.method.schedule import flow_match_sigmas, get_schedule
from swd_jax.models.backbone import backbone_of
from swd_jax.models.mmdit import SD35_LARGE, SD35_MEDIUM, MMDiT, MMDiTConfig

TEACHER_STEPS, TEACHER_CFG = 28, 7.0


def samplers(full: int = 128) -> dict[str, tuple[tuple[int, ...], np.ndarray, bool]]:
    """name -> (scales, sampling sigmas, guided), the SD3.5 schedules' scales multiplied by full / 128."""
    def scaled(scales):
        out = tuple(s * full // 128 for s in scales)
        if any(s * full % 128 or v % 2 for s, v in zip(scales, out)):
            raise ValueError(f"full resolution {full} does not scale {scales} to even latent sizes")
        return out

    four, six = get_schedule("sd35_medium_4"), get_schedule("sd35_medium_6")
    return {"SwD 6-step": (scaled(six.scales), six.sampling_sigmas, False),
            "SwD 4-step": (scaled(four.scales), four.sampling_sigmas, False),
            "full-res 4-step": ((full,) * 4, four.sampling_sigmas, False),
            f"teacher {TEACHER_STEPS}-step CFG": ((full,) * TEACHER_STEPS, flow_match_sigmas(TEACHER_STEPS, 3.0), True)}


def step_flops(cfg: MMDiTConfig, scale: int, next_scale: int | None, guided: bool,
               text_tokens: int = SD35_TEXT_TOKENS) -> float:
    """FLOPs of one sampler step for one image at latent `scale` (XLA cost analysis, abstract bf16 inputs)."""
    model = MMDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = backbone_of(cfg).abstract_params(cfg, jnp.bfloat16)
    S = jax.ShapeDtypeStruct
    x = S((1, scale, scale, cfg.in_channels), jnp.float32)
    cond = {"context": S((1, text_tokens, cfg.joint_attention_dim), jnp.float32),
            "pooled": S((1, cfg.pooled_projection_dim), jnp.float32)}
    f32 = S((), jnp.float32)
    vf = sampler.mmdit_velocity(model)
    if guided:
        lowered = sampler._euler_step.lower(vf, params, x, f32, f32, f32, cond, cond, f32, guided=True)
    else:
        eps = None if next_scale is None else S((1, next_scale, next_scale, cfg.in_channels), jnp.float32)
        lowered = sampler._scale_step.lower(vf, params, x, f32, f32, f32, eps, cond, None, f32, guided=False)
    return float(lowered.cost_analysis()["flops"])


def flops_table(cfg: MMDiTConfig, full: int = 128, log=print) -> dict[str, float]:
    """FLOPs per image of each sampler at this model shape (one cost analysis per distinct step program)."""
    cache: dict = {}

    def cost(scale, nxt, guided):
        key = (scale, nxt, guided)
        if key not in cache:
            cache[key] = step_flops(cfg, scale, nxt, guided)
            log(f"  step at latent {scale} -> {nxt}, guided={guided}: {cache[key] / 1e12:.2f} TFLOP")
        return cache[key]

    out = {}
    for name, (scales, _, guided) in samplers(full).items():
        nexts = list(scales[1:]) + [None]
        out[name] = sum(cost(s, None if guided else n, guided) for s, n in zip(scales, nexts))
    out["one full-res step"] = cost(full, None, False)
    return out


def wall_table(shape: TinyShape, repeats: int, batch: int = 1, teacher_repeats: int = 2,
               log=print) -> dict[str, float]:
    """Median seconds per image of each sampler on the tiny model (CPU), after one warm-up run each."""
    cfg = MMDiTConfig(**shape.mmdit_fields())
    model = MMDiT(cfg)
    rng = np.random.default_rng(0)
    B = batch
    ctx = jnp.asarray(rng.standard_normal((B, shape.text_tokens, shape.joint_dim), dtype=np.float32))
    pooled = jnp.asarray(rng.standard_normal((B, shape.pooled_dim), dtype=np.float32))
    s0 = min(shape.scales)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s0, s0, cfg.in_channels)), jnp.zeros((1,)),
                                 ctx[:1], pooled[:1])["params"]
    cond = {"context": ctx, "pooled": pooled}
    u = random_uncond(shape)
    uncond = {k: jnp.broadcast_to(jnp.asarray(v), (B,) + v.shape[1:]) for k, v in u.items()}
    vf = sampler.mmdit_velocity(model)
    runs = {}
    for name, (scales, sigmas, guided) in samplers(max(shape.scales)).items():
        if guided:
            def run(key, sigmas=sigmas, full=scales[0]):
                x = jax.random.normal(key, (B, full, full, cfg.in_channels))
                return sampler.euler_sample(vf, params, x, sigmas, cond, uncond=uncond, guidance_scale=TEACHER_CFG)
        else:
            def run(key, sched=(scales, sigmas)):
                return sampler.scale_wise_sample(vf, params, cond, key, sched, batch_size=B,
                                                 channels=cfg.in_channels)
        run(jax.random.key(0)).block_until_ready()  # compiles each step shape once
        runs[name] = run
    times = {name: [] for name in runs}
    for r in range(repeats):  # round robin: every sampler sees the same spread of machine load
        for name, run in runs.items():
            if name.startswith("teacher") and r >= teacher_repeats:
                continue
            t = time.perf_counter()
            run(jax.random.key(r + 1)).block_until_ready()
            times[name].append((time.perf_counter() - t) / B)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        log(f"  {name}: {out[name] * 1e3:.1f} ms/image (runs {[round(x * 1e3, 1) for x in ts]})")
    out["one full-res step"] = out["full-res 4-step"] / 4
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-flops", action="store_true")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    res = {}
    if not a.skip_flops:
        for name, cfg in (("SD3.5-Medium", SD35_MEDIUM), ("SD3.5-Large", SD35_LARGE)):
            print(f"{name}: XLA cost analysis, 1024 px, batch 1", flush=True)
            res[name] = flops_table(cfg, log=lambda s: print(s, flush=True))
    if not a.skip_wall:
        with open("/proc/loadavg") as f:
            print(f"tiny SD3.5-M shape on CPU, load average {f.read().split()[:3]}", flush=True)
        res["tiny wall s/image"] = wall_table(TINY_SD35M, a.repeats, log=lambda s: print(s, flush=True))
    names = list(samplers(128))
    cols = [c for c in ("SD3.5-Medium", "SD3.5-Large") if c in res]
    head = f"{'sampler':24s}" + "".join(f" {c + ' TFLOP':>18s} {'x full step':>11s}" for c in cols)
    if "tiny wall s/image" in res:
        head += f" {'tiny ms/image':>14s} {'x full step':>11s}"
    print("\n" + head)
    for n in names:
        row = f"{n:24s}"
        for c in cols:
            row += f" {res[c][n] / 1e12:18.2f} {res[c][n] / res[c]['one full-res step']:11.2f}"
        if "tiny wall s/image" in res:
            w = res["tiny wall s/image"]
            row += f" {w[n] * 1e3:14.1f} {w[n] / w['one full-res step']:11.2f}"
        print(row)
    for c in cols:
        r = res[c]
        print(f"{c}: SwD 4-step = {r['SwD 4-step'] / r['one full-res step']:.2f} full-res steps "
              f"(paper: about 2); SwD 6-step = {r['SwD 6-step'] / r['one full-res step']:.2f}; teacher / SwD 4-step "
              f"= {r[names[-1]] / r['SwD 4-step']:.1f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
