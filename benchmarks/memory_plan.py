"""Memory plan: compiled per-device memory of one SwD training iteration for SD3.5-Medium/-Large on N devices.

    python -m benchmarks.memory_plan                     # Medium, 16 devices, remat on, chunked attention
    python -m benchmarks.memory_plan --models medium,large --remat on,off --attention xla,chunked \\
        --devices 8,16,32,64 --json plan.json             # the whole table (one compile per row group)

The program is `swd_jax.train.steps.make_iteration` jitted as `swd_jax.train.compile_iterations` does (state
donated, base FSDP-sharded over a (1, N, 1) mesh, batch split over it), traced under the logical-axis rules,
at the full-resolution interval (latent 128 = 1024 px: 4096 image + 333 text tokens), bf16 compute and base
weights, f32 LoRA (rank 64) and AdamW states, per-device batch 8 (Medium) / 4 (Large) as the reference.
Inputs are abstract (`benchmarks/abstract_train.py`), devices are fake CPU devices, and XLA:CPU runs its
memory-minimising scheduler (its default favours concurrency and reports 1.2-2x larger temporaries).

How the figures are made, and what they are worth:
- One program per (model, remat, attention) is compiled on `--compile-devices` (default: the first of
  `--devices`); each full-depth compile takes 15-30 min on a 2-core CPU. For the other device counts the
  arguments (the device's shards of state, base and batch) are computed exactly and the temporaries are
  taken from the compiled program: with the per-device batch fixed, only the sharded state changes with N
  (checked on a 3-block model: temporaries 304.7 GiB on 8 devices, 310.2 on 64).
- XLA:CPU buffer assignment is a proxy for TPU's, and a pessimistic one for big programs: the TPU compiler
  adds a rematerialisation pass that trades compute for memory when a program exceeds HBM, and pads small
  minor dimensions. Read the figures as "what the program asks for before TPU-specific savings".
- `--attention chunked` is the model's `attention_impl="chunked"` (`swd_jax.models.layers.chunked_attention`:
  query chunks of 512, each rematerialised; same FLOPs, only [B, H, 512, S] logits live), the memory profile
  of a flash/splash kernel in plain XLA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax

from benchmarks.abstract_train import (GiB, LARGE, MEDIUM, TrainShape, argument_bytes_per_device,
                                       iteration_program, lower_iteration,
                                       memory_per_device)
from swd_jax.train import sharding

XLA_FLAGS = ("--xla_force_host_platform_device_count=64 --xla_cpu_enable_concurrency_optimized_scheduler=false"
             " --xla_backend_optimization_level=0")


def _set_xla_flags():
    """64 fake CPU devices and the memory-minimising scheduler; XLA reads these when its backend starts.

    With JAX_PLATFORMS=tpu (on a TPU VM) nothing is changed: the plan then compiles for the real chips.
    """
    if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


# HBM per chip and how a slice of n chips is named (v4 and v5p names count TensorCores, 2 per chip).
TPUS = (("v5e", 16, lambda n: f"v5litepod-{n}"), ("v6e", 32, lambda n: f"v6e-{n}"),
        ("v4", 32, lambda n: f"v4-{2 * n}"), ("v5p", 95, lambda n: f"v5p-{2 * n}"))


def fits(peak_gib: float, n: int) -> list[str]:
    """The TPU slices of n chips whose HBM per chip holds `peak_gib`."""
    return [name(n) for _, hbm, name in TPUS if peak_gib <= hbm]


def mesh_of(n: int):
    return sharding.make_mesh((1, n, 1), devices=jax.devices()[:n])


def compile_memory(shape: TrainShape, n: int, attention: str = "xla") -> dict:
    """GiB per device of the compiled iteration on a (1, n, 1) mesh, plus compile seconds."""
    t = time.perf_counter()
    compiled = lower_iteration(dataclasses.replace(shape, attention_impl=attention), mesh_of(n)).compile()
    return {**memory_per_device(compiled), "compile_s": time.perf_counter() - t}


def rescale(compiled_at: dict, shape: TrainShape, n: int) -> dict:
    """The figures for n devices from a compile on another count: exact arguments, the same temporaries."""
    _, args = iteration_program(shape, mesh_of(n))
    arg = argument_bytes_per_device(args) / GiB
    other = compiled_at["peak_gib"] - compiled_at["arguments_gib"]  # temporaries + non-aliased outputs
    return {"arguments_gib": arg, "temp_gib": compiled_at["temp_gib"], "peak_gib": arg + other}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="medium", help="comma-separated: medium,large")
    ap.add_argument("--devices", default="16", help="comma-separated device counts (at most 64)")
    ap.add_argument("--compile-devices", type=int, default=0, help="compile on this count (default: first)")
    ap.add_argument("--remat", default="on", help="comma-separated: on,off")
    ap.add_argument("--attention", default="chunked", help="comma-separated: xla,chunked")
    ap.add_argument("--batch-per-device", type=int, default=0, help="override the reference per-device batch")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    _set_xla_flags()
    shapes = {"medium": MEDIUM, "large": LARGE}
    devices = [int(v) for v in a.devices.split(",")]
    n0 = a.compile_devices or devices[0]
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[:3]}; compiling on {n0} fake CPU devices", flush=True)
    results = []
    for model in a.models.split(","):
        for remat in a.remat.split(","):
            for attention in a.attention.split(","):
                shape = dataclasses.replace(shapes[model], remat=remat == "on")
                if a.batch_per_device:
                    shape = dataclasses.replace(shape, batch_per_device=a.batch_per_device)
                print(f"{shape.name}, remat {remat}, attention {attention}, batch/device {shape.batch_per_device}: "
                      f"compiling on {n0} devices ...", flush=True)
                at = compile_memory(shape, n0, attention)
                print(f"  compiled in {at['compile_s']:.0f} s: peak {at['peak_gib']:.1f} GiB/device "
                      f"(arguments {at['arguments_gib']:.2f}, temporaries {at['temp_gib']:.1f})", flush=True)
                for n in devices:
                    mem = at if n == n0 else rescale(at, shape, n)
                    row = {"model": shape.name, "devices": n, "remat": remat == "on", "attention": attention,
                           "batch_per_device": shape.batch_per_device, "global_batch": shape.batch_per_device * n,
                           "compiled_on": n0, **{k: v for k, v in mem.items() if k != "per_block_gib"}}
                    row["fits"] = fits(row["peak_gib"], n)
                    results.append(row)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(results, f, indent=1)
    print(f"\n{'model':13s} {'remat':>5s} {'attention':>10s} {'devices':>7s} {'batch/dev':>9s} {'args GiB':>8s} "
          f"{'peak GiB/dev':>12s}  fits")
    for r in results:
        print(f"{r['model']:13s} {('on' if r['remat'] else 'off'):>5s} {r['attention']:>10s} {r['devices']:7d} "
              f"{r['batch_per_device']:9d} {r['arguments_gib']:8.2f} {r['peak_gib']:12.1f}  "
              f"{', '.join(r['fits']) or 'no TPU chip'}{'' if r['devices'] == r['compiled_on'] else ' *'}")
    print("* arguments exact for this device count, temporaries from the compile on "
          f"{n0} devices")


if __name__ == "__main__":
    main()
