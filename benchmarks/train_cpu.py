"""Seconds and memory of one SwD iteration on CPU: ours (one XLA program) vs the PyTorch reference structure.

    python -m benchmarks.train_cpu [--repeats 5] [--interval 3] [--threads N] [--remat] [--attention xla,chunked] [--json out.json]

One iteration = 5 fake-model updates + 1 generator update, all losses on (DMD with CFG, GAN, PDM), on the
tiny SD3.5-Medium-shaped model of `benchmarks/tiny.py` (6 layers, width 192, dual attention in layers 0-2,
qk-norm, batch 4, fp32, LoRA rank 64) at interval `--interval` (default 3: latent 64, the costliest).
Each framework runs in its own process (no shared thread pools); after one warm-up iteration each (ours
compiles there), the parent alternates them iteration by iteration, so both see the same machine load, and
reports the median and the CPU seconds each iteration used (CPU / wall = cores in use). `--threads N` pins each
process to N cores (CPU affinity, set before either framework starts its thread pools) and sets torch's
intra-op threads to N: XLA:CPU sizes its pool from the affinity and has no other thread switch
(`--xla_cpu_multi_thread_eigen=false` does not stop it using every core). Memory: each process's resident set, sampled every 2 ms, peak during the timed
iterations and its rise over the level just before each; for ours also XLA's compiled buffer sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import threading
import time

from benchmarks.tiny import MICRO, TINY_SD35M, TinyShape, random_batches, random_uncond

_PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 ** 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak resident set of this process while `sampling()` is on (a 2 ms polling thread)."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.peak, self._on = period_s, 0, threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            self._on.wait()
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def measure(self, fn):
        """Run fn(); return (its result, RSS before, peak RSS during)."""
        before = _rss_bytes()
        self.peak = before
        self._on.set()
        try:
            out = fn()
        finally:
            self._on.clear()
        return out, before, max(self.peak, _rss_bytes())


class JaxRunner:
    """Ours: `build_run` + the whole iteration compiled ahead of time (`compile_iterations`), state donated."""
    name = "swd_jax (XLA)"

    def __init__(self, shape: TinyShape, k: int):
        import jax
        import numpy as np
        from swd_jax.train.loop import compile_iterations, to_device
        from swd_jax.train.setup import build_run
        self.run = build_run(shape.run_config(), jax.devices()[:1])
        fn = compile_iterations(self.run, None)[k]
        self.batches = to_device(self.run, random_batches(shape, k))
        self.uncond = {key: jax.device_put(v) for key, v in random_uncond(shape).items()}
        self.state = self.run.state
        t = time.perf_counter()
        with jax.set_mesh(self.run.mesh):
            self.compiled = fn.lower(self.state, self.run.base, self.batches, self.uncond).compile()
        self.compile_s = time.perf_counter() - t
        self._np = np

    def iterate(self):
        self.state, metrics = self.compiled(self.state, self.run.base, self.batches, self.uncond)
        return float(metrics["gen/loss"])  # waits for the whole iteration

    def extra(self) -> dict:
        ma = self.compiled.memory_analysis()
        return {"compile_s": self.compile_s,
                "xla_temp_mib": ma.temp_size_in_bytes / MiB,
                "xla_arguments_mib": ma.argument_size_in_bytes / MiB,
                "xla_outputs_mib": ma.output_size_in_bytes / MiB}


class TorchRunner:
    """The reference structure (benchmarks/torch_swd.py): two model copies, a forward pass per loss term."""
    name = "PyTorch reference (diffusers+peft)"

    def __init__(self, shape: TinyShape, k: int):
        import torch
        from benchmarks.torch_swd import TorchSwD, to_torch_nchw
        from swd_jax.method.schedule import ScaleSchedule
        sched = ScaleSchedule(scales=shape.scales, boundaries=shape.boundaries)
        self.model = TorchSwD(shape.mmdit_fields(), scales=shape.scales, boundaries=shape.boundaries,
                              sigmas=sched.sigmas, lora_rank=shape.lora_rank, cls_blocks=(shape.cls_block,),
                              n_fake_steps=shape.n_fake_steps, cfg_teacher=shape.cfg_teacher,
                              gradient_checkpointing=shape.remat)
        self.batches = to_torch_nchw(random_batches(shape, k))
        self.uncond = to_torch_nchw(random_uncond(shape))
        self.k, self._torch = k, torch

    def iterate(self):
        _, gen_loss = self.model.iteration(self.batches, self.uncond, self.k)
        return float(gen_loss)

    def extra(self) -> dict:
        return {"torch_threads": self._torch.get_num_threads()}


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner}


def _limit_threads(threads: int):
    """Pin this process to `threads` cores and set OpenMP's thread count (before either framework is imported).

    XLA:CPU's intra-op pool has as many threads as the process may run on; the affinity is the only limit it obeys.
    """
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"--threads {threads}: this process may run on only {len(cores)} cores")
    os.sched_setaffinity(0, cores[:threads])
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def _worker(kind: str, shape: TinyShape, k: int, threads: int, conn):
    """Serve ("iterate",) -> (seconds, loss, rss_before, rss_peak) and ("extra",) -> dict until ("stop",)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if threads:
        _limit_threads(threads)
    kind, _, attention = kind.partition(":")  # "jax:chunked" = ours with that attention_impl
    if attention:
        shape = dataclasses.replace(shape, attention=attention)
    runner = RUNNERS[kind](shape, k)
    if threads and kind == "torch":
        runner._torch.set_num_threads(threads)
    sampler = RssSampler()
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg == "iterate":
            t, cpu = time.perf_counter(), _cpu_seconds()
            loss, before, peak = sampler.measure(runner.iterate)
            conn.send((time.perf_counter() - t, loss, before, peak, _cpu_seconds() - cpu))
        elif msg == "extra":
            conn.send({**runner.extra(), "process_peak_rss_mib": _hwm_bytes() / MiB,
                       "cores_allowed": len(os.sched_getaffinity(0))})
        else:
            return


def benchmark(shape: TinyShape, k: int, repeats: int, kinds=("jax", "torch"), threads: int = 0, log=print) -> dict:
    """Warm up each framework's process once, then alternate `repeats` timed iterations; medians and memory."""
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for kind in kinds:
        parent, child = ctx.Pipe()
        procs[kind] = ctx.Process(target=_worker, args=(kind, shape, k, threads, child), daemon=True)
        procs[kind].start()
        conns[kind] = parent
    try:
        for kind in kinds:
            if conns[kind].recv() != "ready":
                raise RuntimeError(f"{kind} worker failed to start")
            conns[kind].send("iterate")
            log(f"{kind}: warm-up iteration {conns[kind].recv()[0]:.2f} s")
        rows = {kind: [] for kind in kinds}
        for r in range(repeats):
            order = kinds if r % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                conns[kind].send("iterate")
                rows[kind].append(conns[kind].recv())
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{kd} {rows[kd][-1][0]:.2f} s (CPU {rows[kd][-1][4]:.1f} s)"
                                                        for kd in kinds))
        out = {}
        for kind in kinds:
            conns[kind].send("extra")
            times = [row[0] for row in rows[kind]]
            name = RUNNERS[kind.partition(":")[0]].name + (f", {kind.partition(':')[2]} attention" if ":" in kind else "")
            out[kind] = {"name": name, "median_s": statistics.median(times), "min_s": min(times),
                         "times_s": times, "loss": rows[kind][-1][1],
                         "cpu_s": [row[4] for row in rows[kind]],
                         "cores_used": statistics.median(row[4] / row[0] for row in rows[kind]),
                         "peak_rss_mib": max(row[3] for row in rows[kind]) / MiB,
                         "iteration_rss_rise_mib": max(row[3] - row[2] for row in rows[kind]) / MiB,
                         **conns[kind].recv()}
            conns[kind].send("stop")
        return out
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--interval", type=int, default=3, help="scale interval k (0..3); 3 = latent 64")
    ap.add_argument("--remat", action="store_true", help="gradient checkpointing in both implementations")
    ap.add_argument("--threads", type=int, default=0, help="cores (CPU affinity) and torch threads per framework (0: all cores, each one's default threads)")
    ap.add_argument("--attention", default="xla", help="ours: comma-separated attention_impl values, e.g. xla,chunked,chunked@128 (@ = chunk rows)")
    ap.add_argument("--micro", action="store_true", help="the seconds-long smoke shape instead of the tiny SD3.5-M")
    ap.add_argument("--json", default="", help="also write the figures here")
    a = ap.parse_args(argv)
    shape = dataclasses.replace(MICRO if a.micro else TINY_SD35M, remat=a.remat)
    ours = tuple(f"jax:{v}" for v in a.attention.split(","))
    if not 0 <= a.interval < len(shape.scales):
        raise SystemExit(f"--interval must be in 0..{len(shape.scales) - 1}")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"shape {shape}\ninterval {a.interval} (latent {shape.scales[a.interval]}), load average {load}, "
          f"{os.cpu_count()} CPUs", flush=True)
    res = benchmark(shape, a.interval, a.repeats, kinds=ours + ("torch",), threads=a.threads,
                    log=lambda s: print(s, flush=True))
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    t = res["torch"]
    print(f"\n{'implementation':48s} {'s/iter (median)':>15s} {'min':>7s} {'cores used':>10s} {'peak RSS MiB':>13s} "
          f"{'rise MiB':>9s}")
    for r in res.values():
        print(f"{r['name']:48s} {r['median_s']:15.2f} {r['min_s']:7.2f} {r['cores_used']:6.2f}/{r['cores_allowed']:<3d} "
              f"{r['peak_rss_mib']:13.0f} {r['iteration_rss_rise_mib']:9.0f}")
    for kind in ours:
        j = res[kind]
        print(f"{j['name']}: speed-up (torch median / ours median) {t['median_s'] / j['median_s']:.2f}x; "
              f"XLA compile {j['compile_s']:.1f} s, XLA temp buffers {j['xla_temp_mib']:.0f} MiB")
    print(f"load average after {load_after}")
    ratio = {kind: t["median_s"] / res[kind]["median_s"] for kind in ours}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": dataclasses.asdict(shape), "interval": a.interval, "load_before": load,
                       "load_after": load_after, "threads": a.threads, "speedup": ratio, **res}, f, indent=1)


if __name__ == "__main__":
    main()
