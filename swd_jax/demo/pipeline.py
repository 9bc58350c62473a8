"""The built-in demo: SwD end to end on scikit-learn's handwritten digits, on CPU, no download.

    python -m swd_jax.demo --workdir /tmp/swd_demo [--config configs/digits_demo.py] [--config.train.steps=...]

One command, every stage cached in the workdir (a rerun skips what is done, an interrupted stage resumes):
1. teacher/        a small MMDiT trained with flow matching on the 1,797 real digits (upsampled), prompts
                   "a handwritten digit seven" through our frozen toy text encoder, 10% empty prompts for CFG;
                   written in the converter's layout, so the SwD trainer loads it with model.source="converted".
2. distill_data.npz  teacher samples (Euler, many steps, CFG), the distillation data, as the paper does.
3. swd/, fullres/  the SwD trainer (`swd_jax.train.train`: DMD + GAN + PDM, LoRA student and fake model) run
                   twice with the same budget: the scale-wise 4-step schedule and a full-resolution 4-step one.
4. results.md, results.json, grids/*.png: prompt accuracy and Frechet distance under a digit classifier
                   trained on the real digits, FLOPs per image (XLA cost analysis) and wall time per image.
Everything runs through the SD3.5 code path (MMDiT, schedule, sampler, losses, train steps, checkpoints);
only the sizes differ. The identity stands in for the VAE: the 1-channel images are the latents.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from swd_jax.convert.orbax_params import check_matches, load_params, tree_metadata
from swd_jax.demo import yardsticks as demo_eval
from swd_jax.demo.teacher import TeacherTraining, save_teacher, teacher_exists, train_teacher
from swd_jax.demo.toy_data import ToyTextEncoder, digit_prompt, load_digits_images
from swd_jax.method.sampler import euler_sample, mmdit_velocity, scale_wise_sample
from swd_jax.method.schedule import ScaleSchedule, flow_match_sigmas
from swd_jax.models.layers import LORA, LoraConfig
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from swd_jax.train.checkpoint import Checkpointer
from swd_jax.train.progress import Progress

DEFAULT_CONFIG = "digits_demo"  # configs/digits_demo.py


# ----------------------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------------------
def teacher_config(c) -> MMDiTConfig:
    return MMDiTConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.demo.teacher.items()})


def text_encoder(cfg: MMDiTConfig) -> ToyTextEncoder:
    """The encoder the SwD trainer's digits source uses (same dims, same seed)."""
    return ToyTextEncoder(cfg.joint_attention_dim, cfg.pooled_projection_dim)


def prompts(enc: ToyTextEncoder, labels: np.ndarray, guided: bool) -> tuple[dict, dict | None]:
    """(cond, uncond) embeddings for digit labels; uncond (the empty prompt) only when guided."""
    ctx, pooled = enc([digit_prompt(i) for i in range(10)])
    cond = {"context": jnp.asarray(ctx[labels]), "pooled": jnp.asarray(pooled[labels])}
    if not guided:
        return cond, None
    u_ctx, u_pooled = enc([""])
    n = len(labels)
    return cond, {"context": jnp.broadcast_to(jnp.asarray(u_ctx), (n,) + u_ctx.shape[1:]),
                  "pooled": jnp.broadcast_to(jnp.asarray(u_pooled), (n,) + u_pooled.shape[1:])}


@functools.lru_cache(maxsize=None)
def velocity_fn(cfg: MMDiTConfig):
    """One velocity function per model config (the sampler compiles per function object)."""
    return mmdit_velocity(MMDiT(cfg))


def merge_lora(base: dict, lora: dict, scale: float) -> dict:
    """base + LoRA folded into the kernels, W' = W + scale * A B (how a distilled student is deployed)."""
    out = dict(base)
    for name, sub in lora.items():
        if name not in base:
            raise ValueError(f"LoRA module {name!r} has no counterpart in the base weights")
        if "lora_A" in sub:
            out[name] = dict(base[name], kernel=base[name]["kernel"] + scale * (sub["lora_A"] @ sub["lora_B"]))
        else:
            out[name] = merge_lora(base[name], sub, scale)
    return out


class _Stage:
    """Prints and records the wall and CPU seconds of one stage."""

    def __init__(self, name: str, timings: dict):
        self.name, self.timings = name, timings

    def __enter__(self):
        print(f"== {self.name}", file=sys.stderr)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.timings[self.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"== {self.name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------------
def stage_teacher(c, workdir: str) -> str:
    """1. Flow-matching teacher on the real digits -> workdir/teacher (skipped when present)."""
    folder = os.path.join(workdir, "teacher")
    if teacher_exists(folder):
        print(f"teacher: using {folder}", file=sys.stderr)
        return folder
    cfg = teacher_config(c)
    images, labels = load_digits_images(cfg.sample_size)
    enc = text_encoder(cfg)
    ctx, pooled = enc([digit_prompt(i) for i in range(10)])
    t = TeacherTraining(**c.demo.pretrain.to_dict())
    params, losses = train_teacher(cfg, t, images, ctx[labels], pooled[labels], enc([""]),
                                   os.path.join(workdir, "teacher_training"))
    save_teacher(folder, cfg, params, {"steps": t.steps, "final_loss_mean50": float(np.mean(losses[-50:] or [0]))})
    return folder


def load_teacher(folder: str) -> tuple[MMDiTConfig, dict]:
    from swd_jax.convert.converted import load_converted
    cfg, params = load_converted(folder)
    return cfg, jax.device_put(params, jax.devices()[0])


def teacher_euler(cfg, params, labels: np.ndarray, steps: int, guidance: float, shift: float, batch: int,
                  seed: int, desc: str) -> tuple[np.ndarray, float]:
    """Teacher samples (Euler, `steps`, CFG `guidance`) for `labels`; (images, seconds per image after warm-up)."""
    enc, vf, sigmas = text_encoder(cfg), velocity_fn(cfg), flow_match_sigmas(steps, shift)
    out, timed_s, timed_n = [], 0.0, 0
    bar = Progress(-(-len(labels) // batch), desc=desc)  # the first batch compiles: not timed for the ETA
    for j, i in enumerate(range(0, len(labels), batch)):
        lab = np.resize(labels[i:i + batch], batch)  # the last chunk is padded: one compiled shape
        cond, uncond = prompts(enc, lab, guidance > 1.0)
        x_init = jax.random.normal(jax.random.fold_in(jax.random.key(seed), j), (batch, cfg.sample_size,
                                   cfg.sample_size, cfg.in_channels))
        x, dt = demo_eval.timed(euler_sample, vf, params, x_init, sigmas, cond, uncond=uncond,
                                guidance_scale=guidance)
        out.append(x[:len(labels[i:i + batch])])
        bar.update(1, compiled=j == 0)
        if j > 0:
            timed_s, timed_n = timed_s + dt, timed_n + batch
    bar.close()
    return np.concatenate(out), (timed_s / timed_n if timed_n else float("nan"))


def stage_data(c, workdir: str, teacher_dir: str) -> str:
    """2. Distillation data: teacher samples with CFG, balanced over the ten prompts -> distill_data.npz."""
    path = os.path.join(workdir, "distill_data.npz")
    if os.path.exists(path):
        print(f"distillation data: using {path}", file=sys.stderr)
        return path
    d = c.demo.data
    cfg, params = load_teacher(teacher_dir)
    labels = np.arange(d.num_images) % 10
    images, sec = teacher_euler(cfg, params, labels, d.steps, d.guidance, c.schedule.shift, c.demo.sample_batch,
                                d.seed, "distillation data (teacher)")
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images.astype(np.float32), labels=labels.astype(np.int32),
             seconds_per_image=np.float64(sec), steps=d.steps, guidance=d.guidance)
    os.replace(tmp, path)
    return path


def distill_config(c, teacher_dir: str, data_path: str, scales) -> ml_collections.ConfigDict:
    """The SwD trainer's config for one student: the demo config, its teacher, data and schedule."""
    d = copy.deepcopy(c)
    with d.unlocked():
        del d["demo"]
    d.model.source, d.model.path, d.data.kind, d.data.path = "converted", teacher_dir, "digits", data_path
    d.schedule.preset, d.schedule.scales = "", tuple(scales)
    return d


def latest_step(ckpt_dir: str) -> int:
    if not os.path.isdir(ckpt_dir):
        return 0
    with Checkpointer(ckpt_dir, save_every=1, keep=1) as ck:
        return ck.latest_step() or 0


def stage_distill(c, workdir: str, name: str, scales, teacher_dir: str, data_path: str,
                  stop_after: int | None) -> bool:
    """3. One SwD distillation run (resumes from its checkpoints); True when it reached train.steps."""
    from swd_jax.train.loop import train
    run_dir = os.path.join(workdir, name)
    if latest_step(os.path.join(run_dir, "checkpoints")) >= c.train.steps:
        print(f"{name}: done ({c.train.steps} steps) in {run_dir}", file=sys.stderr)
        return True
    train(distill_config(c, teacher_dir, data_path, scales), run_dir, stop_after=stop_after,
          devices=jax.devices()[:1])
    return latest_step(os.path.join(run_dir, "checkpoints")) >= c.train.steps


def load_student(c, workdir: str, name: str, cfg: MMDiTConfig, base: dict) -> dict:
    """The student LoRA of the latest checkpoint of run `name`, strictly checked, merged into the base."""
    ckpt_dir = os.path.join(workdir, name, "checkpoints")
    step = latest_step(ckpt_dir)
    path = os.path.join(ckpt_dir, str(step), "state")
    stored = tree_metadata(path)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = load_params(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), stored))
    lora_cfg = LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets))
    model = MMDiT(cfg, lora=lora_cfg)
    x = jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.in_channels))
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)),
                                                 jnp.zeros((1, 1, cfg.joint_attention_dim)),
                                                 jnp.zeros((1, cfg.pooled_projection_dim)))[LORA])
    check_matches(state["student"], jax.tree.map(lambda a: getattr(a, "value", a), expected,
                                                 is_leaf=lambda a: hasattr(a, "value")), path + " (student LoRA)")
    return merge_lora(base, state["student"], lora_cfg.scale)


def student_samples(cfg, params, labels: np.ndarray, scales, sigmas, batch: int, seed: int, desc: str,
                    guidance: float = 1.0) -> tuple[np.ndarray, float]:
    """Scale-wise samples (the SwD sampler) for `labels`; (images, seconds per image after warm-up)."""
    enc, vf = text_encoder(cfg), velocity_fn(cfg)
    out, timed_s, timed_n = [], 0.0, 0
    bar = Progress(-(-len(labels) // batch), desc=desc)  # the first batch compiles: not timed for the ETA
    for j, i in enumerate(range(0, len(labels), batch)):
        lab = np.resize(labels[i:i + batch], batch)
        cond, uncond = prompts(enc, lab, guidance > 1.0)
        x, dt = demo_eval.timed(scale_wise_sample, vf, params, cond, jax.random.fold_in(jax.random.key(seed), j),
                                (scales, sigmas), batch_size=batch, channels=cfg.in_channels, uncond=uncond,
                                guidance_scale=guidance)
        out.append(x[:len(labels[i:i + batch])])
        bar.update(1, compiled=j == 0)
        if j > 0:
            timed_s, timed_n = timed_s + dt, timed_n + batch
    bar.close()
    return np.concatenate(out), (timed_s / timed_n if timed_n else float("nan"))


def stage_eval(c, workdir: str, teacher_dir: str, data_path: str) -> list[dict]:
    """4. Quality and cost of every model on the same prompts; grids to workdir/grids."""
    e, b, g = c.demo.eval, c.demo.sample_batch, c.demo.data.guidance
    cfg, base = load_teacher(teacher_dir)
    clf = demo_eval.DigitClassifier(cfg.sample_size, hidden=e.classifier_hidden, seed=e.seed)
    print(f"digit classifier: {100 * clf.test_accuracy:.1f}% on held-out real digits", file=sys.stderr)
    labels = np.arange(e.num_images) % 10
    swd = ScaleSchedule(tuple(c.schedule.scales), tuple(c.schedule.boundaries), c.schedule.num_train_steps,
                        c.schedule.shift, cfg.patch_size)
    full = ScaleSchedule(tuple(c.demo.baseline_scales), swd.boundaries, swd.num_train_steps, swd.shift,
                         cfg.patch_size)
    vf, enc, ch, s = velocity_fn(cfg), text_encoder(cfg), cfg.in_channels, cfg.sample_size
    cond_u, uncond = prompts(enc, np.arange(b) % 10, True)
    cond_c, _ = prompts(enc, np.arange(b) % 10, False)
    rows, grids = [], {}

    with np.load(data_path) as z:  # the many-step teacher's samples are the distillation data
        n = min(e.num_images, len(z["labels"]))
        if n < e.num_images or (z["labels"][:n] != labels[:n]).any():
            raise ValueError(f"{data_path} must start with {e.num_images} images cycling the 10 prompts")
        many, many_sec, many_steps = z["images"][:n], float(z["seconds_per_image"]), int(z["steps"])
    teacher_feats = clf.features(many)

    def add(name, steps, sizes, images, sec, flops):
        grids[name] = images
        fd_t = None if images is many else demo_eval.frechet_distance(teacher_feats, clf.features(images))
        rows.append({"model": name, "steps": steps, "latent sizes": sizes, "ms / image": 1e3 * sec,
                     "MFLOPs / image": flops / 1e6, **_q(clf, images, labels), "FD to teacher": fd_t})

    euler1 = demo_eval.euler_flops(vf, base, cond_u, 1, s, batch_size=b, channels=ch, uncond=uncond,
                                   guidance_scale=g)
    add(f"teacher, Euler, CFG {g:g}", many_steps, f"{s}", many, many_sec, many_steps * euler1)
    k = len(swd.scales)
    x, sec = teacher_euler(cfg, base, labels, k, g, swd.shift, b, e.seed, f"teacher {k} steps")
    add(f"teacher, Euler, CFG {g:g} (undistilled)", k, f"{s}", x, sec, k * euler1)
    for name, sched, params in (
            ("teacher, scale-wise, no CFG (undistilled)", swd, base),
            ("full-resolution student (DMD+GAN+PDM)", full, load_student(c, workdir, "fullres", cfg, base)),
            ("SwD student (DMD+GAN+PDM)", swd, load_student(c, workdir, "swd", cfg, base))):
        x, sec = student_samples(cfg, params, labels, sched.scales, sched.sampling_sigmas, b, e.seed, name)
        flops = demo_eval.scale_wise_flops(vf, params, cond_c, sched.scales, sched.sampling_sigmas, batch_size=b,
                                           channels=ch)
        add(name, k, ",".join(map(str, sched.scales)), x, sec, flops)
    ref = next(r for r in rows if r["model"].startswith("full-resolution"))["MFLOPs / image"]
    for r in rows:
        r["FLOPs vs full-res 4-step"] = r["MFLOPs / image"] / ref
    test_feats = clf.features(clf.real_test)  # the reference row: held-out real digits vs the training digits
    real = {"prompt acc. %": 100.0 * clf.test_accuracy,
            "FD": demo_eval.frechet_distance(clf.features(clf.real_train), test_feats),
            "FD to teacher": demo_eval.frechet_distance(teacher_feats, test_feats)}
    rows.append({"model": "real digits (held out, reference)", "steps": None, "latent sizes": f"{s}", **real})
    os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
    for name, images in grids.items():
        demo_eval.save_grid(images[:10 * e.grid_rows], os.path.join(workdir, "grids", _slug(name) + ".png"))
    demo_eval.save_grid(np.concatenate([clf.real_test[clf.labels_test == d][:e.grid_rows] for d in range(10)])
                        .reshape(10, e.grid_rows, s, s, 1).transpose(1, 0, 2, 3, 4).reshape(-1, s, s, 1),
                        os.path.join(workdir, "grids", "real_digits.png"))
    return rows


def _q(clf, images, labels) -> dict:
    q = demo_eval.quality(clf, images, labels)
    return {"prompt acc. %": q["prompt_acc"], "FD": q["fd"]}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_").replace("__", "_")


# ----------------------------------------------------------------------------------------------------------------
# the whole chain
# ----------------------------------------------------------------------------------------------------------------
def run_demo(c, workdir: str, *, stop_after: int | None = None) -> dict | None:
    """All four stages; returns {rows, timings, table} or None when `stop_after` interrupted a distillation run.

    `stop_after` ends each distillation run after that many iterations in this call (to test resumption).
    """
    os.makedirs(workdir, exist_ok=True)
    timings: dict = {}
    t0 = time.perf_counter()
    with _Stage("1 teacher (flow matching)", timings):
        teacher_dir = stage_teacher(c, workdir)
    with _Stage("2 distillation data (teacher samples)", timings):
        data_path = stage_data(c, workdir, teacher_dir)
    for name, scales in (("swd", c.schedule.scales), ("fullres", c.demo.baseline_scales)):
        with _Stage(f"3 distill: {name} {tuple(scales)}", timings):
            if not stage_distill(c, workdir, name, scales, teacher_dir, data_path, stop_after):
                print(f"{name}: stopped early (stop_after={stop_after}); rerun to resume", file=sys.stderr)
                return None
    with _Stage("4 evaluation", timings):
        rows = stage_eval(c, workdir, teacher_dir, data_path)
    timings["total"] = {"wall_s": round(time.perf_counter() - t0, 1)}
    table = demo_eval.markdown_table(rows)
    result = {"rows": rows, "timings": timings, "table": table}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(workdir, "timings.jsonl"), "a") as f:  # one line per invocation, cached or not
        f.write(json.dumps(timings) + "\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\nStage times (this run; cached stages take ~0 s):\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in timings.items()) + "\n")
    print(table)
    return result
