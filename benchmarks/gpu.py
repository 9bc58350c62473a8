"""One-GPU benchmark (H100/H200), one command, about 8 minutes: sampler latency and one SwD training iteration.

    python -m benchmarks.gpu --out gpu_figures.json            # on a machine with one H100 or H200
    python -m benchmarks.gpu --tiny --out /tmp/smoke.json      # the same code path on CPU at a tiny shape

Random SD3.5-Medium weights (published shapes) in bf16, 333 text tokens, batch 1, 1024 px (latent 128):
1. sampler latency, median of `--repeats`: SwD 6-step, SwD 4-step, full-resolution 4-step; ours
   (`swd_jax.sampler.scale_wise_sample`, attention `--attention`) and diffusers/PyTorch (SD3Transformer2DModel,
   SDPA attention, the reference's sampler loop);
2. one SwD training iteration at the full-resolution interval (5 fake + 1 generator update, all losses,
   remat, per-GPU batch `--train-batch`): seconds, images/s (6 batches per iteration), model FLOP utilisation
   (model FLOPs from XLA's cost analysis of the iteration without remat, over the chip's dense bf16 peak);
   and the PyTorch reference structure (benchmarks/torch_swd.py, bf16 autocast, gradient checkpointing).
Figures are written to `--out` after every phase, so a run cut short keeps what it measured. A phase is
skipped, and marked so, when less than its estimate is left of `--budget-s`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

# Peak dense bf16 tensor FLOP/s by device kind (NVIDIA data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


@dataclasses.dataclass
class Setup:
    """What one run measures; `tiny()` shrinks it to a CPU smoke test of the same code path."""
    mmdit_fields: dict
    scales_4: tuple[int, ...] = (64, 80, 96, 128)
    scales_6: tuple[int, ...] = (32, 48, 64, 80, 96, 128)
    text_tokens: int = 333
    train_batch: int = 8
    cls_block: int = 11
    lora_rank: int = 64
    remat: bool = True
    dtype: str = "bfloat16"
    attention: str = "cudnn"
    device: str = "cuda"

    @property
    def full(self) -> int:
        return self.scales_4[-1]


def medium_setup(a) -> Setup:
    from swd_jax.models.mmdit import SD35_MEDIUM
    return Setup(dataclasses.asdict(SD35_MEDIUM), train_batch=a.train_batch, attention=a.attention)


def tiny_setup(a) -> Setup:
    from benchmarks.tiny import MICRO
    # Few distinct step shapes (8->8, 8->16, 16->16, 16->end): few compiles.
    return Setup(MICRO.mmdit_fields(), scales_4=(8, 8, 16, 16), scales_6=(8, 8, 8, 16, 16, 16), text_tokens=MICRO.text_tokens,
                 train_batch=2, cls_block=0, lora_rank=4, remat=False, dtype="float32", attention="xla",
                 device="cpu")


def _sigmas(n_steps: int):
    from swd_jax.schedule import get_schedule
    return get_schedule("sd35_medium_6" if n_steps == 6 else "sd35_medium_4").sampling_sigmas


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: compiles / autotunes
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def sampler_latency_jax(s: Setup, repeats: int) -> dict:
    """Ours: seconds per 1-image sample for SwD 6/4-step and full-resolution 4-step."""
    import jax
    import jax.numpy as jnp
    from swd_jax.models.mmdit import MMDiT, MMDiTConfig
    from swd_jax.sampler import scale_wise_sample
    cfg = MMDiTConfig(**s.mmdit_fields)
    dt = jnp.bfloat16 if s.dtype == "bfloat16" else jnp.float32
    model = MMDiT(cfg, dtype=dt, param_dtype=dt, attention_impl=s.attention)
    ctx = jnp.zeros((1, s.text_tokens, cfg.joint_attention_dim), dt) + 0.1
    pooled = jnp.zeros((1, cfg.pooled_projection_dim), dt) + 0.1
    x0 = jnp.zeros((1, 2 * cfg.patch_size, 2 * cfg.patch_size, cfg.in_channels), dt)
    params = jax.jit(lambda k: model.init(k, x0, jnp.zeros((1,)), ctx, pooled)["params"])(jax.random.key(0))
    cond = {"context": ctx, "pooled": pooled}

    def vf(p, x, t, c):
        return model.apply({"params": p}, x.astype(dt), t, c["context"], c["pooled"])

    out = {}
    for name, scales, sigmas in (("SwD 6-step", s.scales_6, _sigmas(6)), ("SwD 4-step", s.scales_4, _sigmas(4)),
                                 ("full-res 4-step", (s.full,) * 4, _sigmas(4))):
        run = lambda: scale_wise_sample(vf, params, cond, jax.random.key(1), (scales, sigmas), batch_size=1,
                                        channels=cfg.in_channels).block_until_ready()
        med, times = _median_time(run, repeats)
        out[name] = {"median_s": med, "times_s": times, "scales": list(scales)}
        print(f"  ours {name}: {med * 1e3:.1f} ms", flush=True)
    return out


def sampler_latency_torch(s: Setup, repeats: int) -> dict:
    """diffusers SD3Transformer2DModel + the reference's scale-wise loop, same samplers."""
    import torch
    from diffusers import SD3Transformer2DModel
    from benchmarks.torch_swd import scale_wise_sample_torch
    dt = torch.bfloat16 if s.dtype == "bfloat16" else torch.float32
    dev = torch.device(s.device)
    fields = dict(s.mmdit_fields, dual_attention_layers=tuple(s.mmdit_fields["dual_attention_layers"]))
    with dev:
        model = SD3Transformer2DModel(**fields).to(dt).eval()
    ctx = torch.full((1, s.text_tokens, fields["joint_attention_dim"]), 0.1, dtype=dt, device=dev)
    pooled = torch.full((1, fields["pooled_projection_dim"]), 0.1, dtype=dt, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {}
    for name, scales, sigmas in (("SwD 6-step", s.scales_6, _sigmas(6)), ("SwD 4-step", s.scales_4, _sigmas(4)),
                                 ("full-res 4-step", (s.full,) * 4, _sigmas(4))):
        def run():
            scale_wise_sample_torch(model, ctx, pooled, scales, sigmas, channels=fields["in_channels"])
            sync()
        med, times = _median_time(run, repeats)
        out[name] = {"median_s": med, "times_s": times}
        print(f"  torch {name}: {med * 1e3:.1f} ms", flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _train_shape(s: Setup):
    """The TinyShape-like record the run config and batches are built from, at this setup's sizes."""
    from benchmarks.tiny import TinyShape
    f = s.mmdit_fields
    return TinyShape(num_layers=f["num_layers"], heads=f["num_attention_heads"], head_dim=f["attention_head_dim"],
                     dual_attention_layers=tuple(f["dual_attention_layers"]), joint_dim=f["joint_attention_dim"],
                     pooled_dim=f["pooled_projection_dim"], text_tokens=s.text_tokens, channels=f["in_channels"],
                     scales=s.scales_4, boundaries=(0, 7, 14, 18, 28), batch=s.train_batch, lora_rank=s.lora_rank,
                     cls_block=s.cls_block, n_fake_steps=5, cfg_teacher=7.0, remat=s.remat, dtype=s.dtype)


def train_iteration_jax(s: Setup, repeats: int) -> dict:
    """Ours: one iteration at the full-resolution interval; seconds, images/s, FLOPs and MFU."""
    import jax
    from benchmarks.tiny import random_batches, random_uncond
    from swd_jax.train import compile_iterations, to_device
    from swd_jax.train_setup import build_run
    shape = _train_shape(s)
    c = shape.run_config()
    c.model.attention_impl = s.attention
    c.model.random.sample_size = s.mmdit_fields["sample_size"]
    c.model.random.pos_embed_max_size = s.mmdit_fields["pos_embed_max_size"]
    run = build_run(c, jax.devices()[:1])
    k = len(shape.scales) - 1
    fn = compile_iterations(run, None)[k]
    batches = to_device(run, random_batches(shape, k))
    uncond = {key: jax.device_put(v) for key, v in random_uncond(shape).items()}
    t = time.perf_counter()
    with jax.set_mesh(run.mesh):
        compiled = fn.lower(run.state, run.base, batches, uncond).compile()
    compile_s = time.perf_counter() - t
    state = run.state

    def step():
        nonlocal state
        state, metrics = compiled(state, run.base, batches, uncond)
        float(metrics["gen/loss"])

    med, times = _median_time(step, repeats)
    # Model FLOPs: the same iteration without remat, lowered only (XLA's count before optimisation).
    from swd_jax.train_steps import make_iteration
    models = dataclasses.replace(run.models, mmdit=run.models.mmdit.clone(remat=False))
    with jax.set_mesh(run.mesh):
        model_flops = float(jax.jit(make_iteration(models, k)).lower(
            state, run.base, batches, uncond).cost_analysis()["flops"])
    hw = compiled.cost_analysis()
    hw_flops = float(hw["flops"]) if hw and "flops" in hw else None
    images = (shape.n_fake_steps + 1) * shape.batch
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind)
    mem = compiled.memory_analysis()
    out = {"median_s": med, "times_s": times, "compile_s": compile_s, "images_per_s": images / med,
           "batch": shape.batch, "latent": shape.scales[k], "model_flops": model_flops, "compiled_flops": hw_flops,
           "device_kind": dev.device_kind, "peak_bf16_flops": peak,
           "mfu": model_flops / med / peak if peak else None,
           "temp_gib": mem.temp_size_in_bytes / 2 ** 30 if mem else None}
    print(f"  ours: {med:.2f} s/iteration, {out['images_per_s']:.1f} images/s, MFU "
          f"{out['mfu'] if out['mfu'] is None else round(out['mfu'], 3)} (compile {compile_s:.0f} s)", flush=True)
    return out


def train_iteration_torch(s: Setup, repeats: int) -> dict:
    """The reference structure on diffusers + peft (bf16 weights, bf16 autocast, gradient checkpointing)."""
    import torch
    from benchmarks.tiny import random_batches, random_uncond
    from benchmarks.torch_swd import TorchSwD, to_torch_nchw
    from swd_jax.schedule import ScaleSchedule
    shape = _train_shape(s)
    dev = torch.device(s.device)
    bf16 = s.dtype == "bfloat16"
    fields = dict(s.mmdit_fields, dual_attention_layers=tuple(s.mmdit_fields["dual_attention_layers"]))
    model = TorchSwD(fields, scales=shape.scales, boundaries=shape.boundaries,
                     sigmas=ScaleSchedule(shape.scales, shape.boundaries).sigmas, lora_rank=shape.lora_rank,
                     cls_blocks=(shape.cls_block,), n_fake_steps=shape.n_fake_steps, cfg_teacher=shape.cfg_teacher,
                     device=dev, weight_dtype=torch.bfloat16 if bf16 else torch.float32,
                     autocast_dtype=torch.bfloat16 if bf16 and dev.type == "cuda" else None,
                     gradient_checkpointing=s.remat)
    k = len(shape.scales) - 1
    batches = to_torch_nchw(random_batches(shape, k), device=dev)
    uncond = to_torch_nchw(random_uncond(shape), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        model.iteration(batches, uncond, k)
        sync()

    med, times = _median_time(step, repeats)
    images = (shape.n_fake_steps + 1) * shape.batch
    out = {"median_s": med, "times_s": times, "images_per_s": images / med, "batch": shape.batch,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None}
    print(f"  torch: {med:.2f} s/iteration, {out['images_per_s']:.1f} images/s", flush=True)
    return out


# (phase name, function, rough seconds it needs on an H100, used against --budget-s)
PHASES = [("sampler_ours", sampler_latency_jax, 90), ("sampler_torch", sampler_latency_torch, 60),
          ("train_ours", train_iteration_jax, 180), ("train_torch", train_iteration_torch, 90)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_figures.json")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the same code path at a tiny shape")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=8, help="images per batch in the training iteration")
    ap.add_argument("--attention", default="cudnn", choices=("cudnn", "xla"), help="our attention implementation")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: " + ",".join(p[0] for p in PHASES))
    ap.add_argument("--budget-s", type=float, default=450.0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate
        try:
            return _run(a, tiny_setup(a), t0)
        finally:
            torch.set_num_threads(threads)
    return _run(a, medium_setup(a), t0)


def _run(a, s: Setup, t0: float):
    import jax
    if not a.tiny and jax.devices()[0].platform != "gpu":
        raise SystemExit(f"no GPU visible to JAX ({jax.devices()}); use --tiny for the CPU smoke run")
    res = {"setup": dataclasses.asdict(s), "jax_devices": [d.device_kind for d in jax.devices()],
           "argv": sys.argv[1:], "phases": {}}
    skip = {p for p in a.skip.split(",") if p}
    for name, fn, estimate in PHASES:
        left = a.budget_s - (time.perf_counter() - t0)
        if name in skip or (not a.tiny and left < estimate):
            res["phases"][name] = {"skipped": "by --skip" if name in skip else f"{left:.0f} s of budget left"}
            continue
        print(f"{name} ...", flush=True)
        t = time.perf_counter()
        try:
            res["phases"][name] = fn(s, a.repeats)
        except Exception as e:  # keep the other phases' figures
            traceback.print_exc()
            res["phases"][name] = {"error": f"{type(e).__name__}: {e}"}
        res["phases"][name]["phase_s"] = time.perf_counter() - t
        res["total_s"] = time.perf_counter() - t0
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    p = res["phases"]
    for n in ("SwD 6-step", "SwD 4-step", "full-res 4-step"):
        o, t = p.get("sampler_ours", {}).get(n), p.get("sampler_torch", {}).get(n)
        if o and t:
            print(f"{n}: ours {o['median_s'] * 1e3:.1f} ms, torch {t['median_s'] * 1e3:.1f} ms, "
                  f"speed-up {t['median_s'] / o['median_s']:.2f}x")
    if "median_s" in p.get("train_ours", {}) and "median_s" in p.get("train_torch", {}):
        print(f"training iteration speed-up: {p['train_torch']['median_s'] / p['train_ours']['median_s']:.2f}x")
    print(f"figures in {a.out} ({res.get('total_s', 0):.0f} s)")


if __name__ == "__main__":
    main()
