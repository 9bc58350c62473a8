"""One-GPU benchmark (H100/H200), one command, about 8 minutes: sampler latency and one SwD training iteration.

    python -m benchmarks.gpu --out gpu_figures.json            # on a machine with one H100 or H200
    python -m benchmarks.gpu --tiny --out /tmp/smoke.json      # the same code path on CPU at a tiny shape

Random SD3.5-Medium weights (published shapes) in bf16, 333 text tokens, batch 1, 1024 px (latent 128):
1. sampler latency, median of `--repeats`: SwD 6-step, SwD 4-step, full-resolution 4-step; ours
   (`swd_jax.method.sampler.scale_wise_sample`, attention `--attention`) and diffusers/PyTorch (SD3Transformer2DModel,
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

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.abstract_train import MEDIUM, TrainShape, build_models
from benchmarks.tiny import synthetic_batches, synthetic_uncond
from swd_jax.method.schedule import ScaleSchedule
from swd_jax.models.backbone import backbone_of
from swd_jax.models.mmdit import MMDiT
from swd_jax.models.mmdit import example_inputs
from swd_jax.train.setup import DTYPES
from swd_jax.train.steps import init_state, make_iteration

# Peak dense bf16 tensor FLOP/s by device kind (NVIDIA data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


@dataclasses.dataclass
class Setup:
    """What one run measures; `tiny_setup` shrinks it to a CPU smoke test of the same code path."""
    train: TrainShape
    scales_4: tuple[int, ...] = (64, 80, 96, 128)
    scales_6: tuple[int, ...] = (32, 48, 64, 80, 96, 128)
    device: str = "cuda"

    @property
    def full(self) -> int:
        return self.scales_4[-1]

    @property
    def mmdit_fields(self) -> dict:
        return dataclasses.asdict(self.train.model)


def medium_setup(a) -> Setup:
    return Setup(dataclasses.replace(MEDIUM, batch_per_device=a.train_batch, attention_impl=a.attention))


def tiny_setup(a) -> Setup:
    from benchmarks.tiny import MICRO
    from swd_jax.models.mmdit import MMDiTConfig
    # Few distinct step shapes (8->8, 8->16, 16->16, 16->end): few compiles.
    scales_4 = (8, 8, 16, 16)
    train = TrainShape("micro", MMDiTConfig(**MICRO.mmdit_fields()), ScaleSchedule(scales_4, (0, 7, 14, 18, 28)),
                       batch_per_device=2, cls_block=0, cfg_teacher=7.0, text_tokens=MICRO.text_tokens, lora_rank=4,
                       remat=False, dtype="float32", param_dtype="float32")
    return Setup(train, scales_4=scales_4, scales_6=(8, 8, 8, 16, 16, 16), device="cpu")


def random_base(cfg, dtype, key) -> dict:
    """Random base weights N(0, 0.02^2) of the right shapes, made on the device (no host tables, no constants)."""
    abstract = backbone_of(cfg).abstract_params(cfg, dtype)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    make = jax.jit(lambda ks: [(0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
                               for k, a in zip(ks, leaves)])
    return jax.tree.unflatten(treedef, make(keys))


def fresh_state(m, key) -> dict:
    """A new train state (LoRA A ~ N(0, 1/r^2), B = 0, head init, optimiser states) without a model init."""
    from swd_jax.models.layers import LORA
    cfg, r = m.transformer.config, m.transformer.lora.rank
    lora_model = MMDiT(cfg, lora=m.transformer.lora, param_dtype=jnp.float32)
    abstract = nn.unbox(jax.eval_shape(lambda k: lora_model.init(k, *example_inputs(cfg, 1))[LORA], key))

    def lora(k):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        ks = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(treedef, [
            jax.random.normal(kk, a.shape, a.dtype) / r if path[-1].key == "lora_A" else jnp.zeros(a.shape, a.dtype)
            for kk, (path, a) in zip(ks, leaves)])

    def make(key):
        k1, k2, k3 = jax.random.split(key, 3)
        head = nn.unbox(m.head.init(k3, jnp.zeros((1, 1, cfg.inner_dim)))["params"])
        return init_state(lora(k1), lora(k2), head, m, jax.random.key_data(key))

    return jax.jit(make)(key)


def _sigmas(n_steps: int):
    from swd_jax.method.schedule import get_schedule
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
    from swd_jax.method.sampler import scale_wise_sample
    t, cfg = s.train, s.train.model
    dt = DTYPES[t.dtype]
    model = MMDiT(cfg, dtype=dt, param_dtype=dt, attention_impl=t.attention_impl)
    ctx = jnp.zeros((1, t.text_tokens, cfg.joint_attention_dim), dt) + 0.1
    pooled = jnp.zeros((1, cfg.pooled_projection_dim), dt) + 0.1
    params = random_base(cfg, dt, jax.random.key(0))
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
    dt = torch.bfloat16 if s.train.dtype == "bfloat16" else torch.float32
    dev = torch.device(s.device)
    fields = s.mmdit_fields
    with dev:
        model = SD3Transformer2DModel(**fields).to(dt).eval()
    ctx = torch.full((1, s.train.text_tokens, fields["joint_attention_dim"]), 0.1, dtype=dt, device=dev)
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


def _batches(t: TrainShape, schedule, k: int) -> dict:
    """Random [n_fake + 1, B, ...] float32 batches at interval k, NHWC latents."""
    return synthetic_batches(t.n_fake_steps + 1, t.batch_per_device, schedule.scale(k), schedule.prev_scale(k),
                             t.model.in_channels, t.text_tokens, t.model.joint_attention_dim,
                             t.model.pooled_projection_dim)


def _uncond(t: TrainShape) -> dict:
    return synthetic_uncond(t.text_tokens, t.model.joint_attention_dim, t.model.pooled_projection_dim)


def train_iteration_jax(s: Setup, repeats: int) -> dict:
    """Ours: one iteration at the full-resolution interval; seconds, images/s, FLOPs and MFU."""
    t = s.train
    m = build_models(t)
    k = m.schedule.num_intervals - 1
    base = random_base(t.model, DTYPES[t.param_dtype], jax.random.key(0))
    state = fresh_state(m, jax.random.key(1))
    batches = jax.device_put(_batches(t, m.schedule, k))
    uncond = jax.device_put(_uncond(t))
    fn = jax.jit(make_iteration(m, k), donate_argnums=(0,))
    tc = time.perf_counter()
    lowered = fn.lower(state, base, batches, uncond)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tc

    def step():
        nonlocal state
        state, metrics = compiled(state, base, batches, uncond)
        float(metrics["gen/loss"])

    med, times = _median_time(step, repeats)
    # Model FLOPs: XLA's count before optimisation of the iteration without remat (re-traced if remat is on).
    if t.remat:
        no_remat = dataclasses.replace(m, transformer=m.transformer.clone(remat=False))
        lowered = jax.jit(make_iteration(no_remat, k)).lower(state, base, batches, uncond)
    model_flops = float(lowered.cost_analysis()["flops"])
    hw = compiled.cost_analysis()
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind) if dev.platform == "gpu" else None
    mem = compiled.memory_analysis()
    images = (t.n_fake_steps + 1) * t.batch_per_device
    out = {"median_s": med, "times_s": times, "compile_s": compile_s, "images_per_s": images / med,
           "batch": t.batch_per_device, "latent": m.schedule.scale(k), "attention": t.attention_impl,
           "remat": t.remat, "model_flops": model_flops,
           "compiled_flops": float(hw["flops"]) if hw and "flops" in hw else None,
           "device_kind": dev.device_kind, "peak_bf16_flops": peak, "mfu": model_flops / med / peak if peak else None,
           "temp_gib": mem.temp_size_in_bytes / 2 ** 30 if mem else None}
    mfu = "n/a" if out["mfu"] is None else f"{out['mfu']:.3f}"
    print(f"  ours: {med:.2f} s/iteration, {out['images_per_s']:.1f} images/s, MFU {mfu} (compile {compile_s:.0f} s)",
          flush=True)
    return out


def train_iteration_torch(s: Setup, repeats: int) -> dict:
    """The reference structure on diffusers + peft (bf16 weights, bf16 autocast, gradient checkpointing)."""
    import torch
    from benchmarks.torch_swd import TorchSwD, to_torch_nchw
    t = s.train
    sched = build_models(t).schedule
    dev = torch.device(s.device)
    bf16 = t.dtype == "bfloat16"
    model = TorchSwD(s.mmdit_fields, scales=sched.scales, boundaries=sched.boundaries, sigmas=sched.sigmas,
                     lora_rank=t.lora_rank, cls_blocks=(t.cls_block,), n_fake_steps=t.n_fake_steps,
                     cfg_teacher=t.cfg_teacher, device=dev, weight_dtype=torch.bfloat16 if bf16 else torch.float32,
                     autocast_dtype=torch.bfloat16 if bf16 and dev.type == "cuda" else None,
                     gradient_checkpointing=t.remat)
    k = sched.num_intervals - 1
    batches = to_torch_nchw(_batches(t, sched, k), device=dev)
    uncond = to_torch_nchw(_uncond(t), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        model.iteration(batches, uncond, k)
        sync()

    med, times = _median_time(step, repeats)
    images = (t.n_fake_steps + 1) * t.batch_per_device
    out = {"median_s": med, "times_s": times, "images_per_s": images / med, "batch": t.batch_per_device,
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
    ap.add_argument("--attention", default="cudnn", choices=("cudnn", "xla", "chunked"), help="our attention implementation")
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
