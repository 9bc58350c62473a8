"""SwD training: `python -m swd_jax.train --config configs/tiny.py --workdir DIR [--config.train.lr=...]`.

The loop dispatches iteration N before it reads iteration N-1's metrics (the host never stalls the device),
compiles one program per scale interval ahead of use, checkpoints asynchronously (student, fake, head, both
optimiser states, step, PRNG key, data position; never the frozen base), resumes from the latest checkpoint
automatically, stops with a clear error on a non-finite loss, and exports the student LoRA as a PEFT adapter.
Several processes (a TPU slice, or `launch/local_multiprocess.sh`) run the same loop, each feeding its own
share of every global batch; `swd_jax.train.distributed` connects them first.

Robustness: the workdir is locked (`<workdir>/.lock`, process 0; a second run stops naming the first one's pid
and host); a state is saved only if every array is finite, and a checkpoint whose next iteration gives a
non-finite loss is moved aside (`<step>.nonfinite`), so a rerun never resumes from poisoned weights;
`metrics.jsonl` holds each step once (a resume drops the rows after its checkpoint; a deleted file is
recreated). After a kill (any moment: compile, mid-step, inside a save) a rerun resumes from the latest
complete checkpoint and ends bitwise equal to an uninterrupted run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

import jax
import numpy as np

from swd_jax.train import distributed, sharding
from swd_jax.train.checkpoint import Checkpointer
from swd_jax.train.config_checks import check_values, resume_changes
from swd_jax.train.sources import make_source
from swd_jax.train.setup import Run, build_run, count_params, loss_config
from swd_jax.train.steps import batches_per_iteration, make_iteration


def compile_iterations(run: Run, source) -> dict:
    """One jitted program per scale interval: (state, base, batches, uncond) -> (state, metrics), state donated."""
    mesh, m = run.mesh, run.models
    data_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    rep = sharding.replicated(mesh)
    fns = {}
    for k in range(m.schedule.num_intervals):
        fns[k] = jax.jit(make_iteration(m, k),
                         in_shardings=(run.state_shardings, run.base_shardings, data_sharding, rep),
                         out_shardings=(run.state_shardings, rep), donate_argnums=(0,))
    return fns


def to_device(run: Run, host_batches: dict) -> dict:
    """Host-local numpy batches [n, B_host, ...] -> global arrays sharded over data x fsdp on axis 1."""
    s = sharding.batch_sharding(run.mesh, leading_axes=1)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v, np.float32)) for k, v in host_batches.items()}


class WorkdirInUse(FileExistsError):
    """Another run holds the workdir."""


class WorkdirLock:
    """An exclusive `flock` on `<workdir>/.lock` held by process 0 for the run (released by the OS on a kill)."""

    def __init__(self, workdir: str):
        self.file = None
        if jax.process_index() != 0:
            return
        path = os.path.join(workdir, ".lock")
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise WorkdirInUse(f"{workdir} is in use by {owner}; stop that run or use another --workdir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        self.file.flush()

    def release(self):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class MetricsWriter:
    """Every metric to TensorBoard (tensorboardX) and to `metrics.jsonl` (one row per step), from process 0 only.

    Opening it for a run resumed at `start` drops the rows of later steps (written before a kill, replayed now);
    a `metrics.jsonl` deleted during the run is recreated with a warning.
    """

    def __init__(self, workdir: str, start: int = 0):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1 if start else None)
            self.path = os.path.join(workdir, "metrics.jsonl")
            self._keep_rows_up_to(start)
            self.jsonl = open(self.path, "a")

    def _keep_rows_up_to(self, start: int):
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: only the last can be
                    print(f"{self.path} line {n}: not JSON (cut by a kill?); dropped", file=sys.stderr)
                    continue
                if row.get("step", 0) <= start:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if not os.path.exists(self.path):
            print(f"{self.path} was deleted during the run; recreated from step {step}", file=sys.stderr)
            self.jsonl.close()
            self.jsonl = open(self.path, "a")
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, grid_HW3: np.ndarray, step: int):
        """A uint8 [H, W, 3] image to TensorBoard (validation grids)."""
        if self.active:
            self.tb.add_image(tag, grid_HW3, step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.active:
            self.tb.close()
            self.jsonl.close()


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer):
    """Stop on a non-finite loss; the checkpoint it was computed from (step - 1), if any, is moved aside."""
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        ckpt.wait_until_finished()
        moved = ckpt.quarantine(step - 1, f"iteration {step} from this state gave non-finite losses {bad}")
        note = f" Checkpoint {step - 1}, which gave it, was moved to {moved}." if moved else ""
        raise FloatingPointError(f"non-finite loss at step {step}: {bad}. Stopped.{note} "
                                 f"{ckpt.last_good_message()} Lower the learning rate or check the data.")


def train(config, workdir: str, *, stop_after: int | None = None, devices=None,
          allow_config_change: bool = False) -> dict:
    """Run (or resume) the SwD distillation described by `config`; returns the last logged metrics.

    `stop_after` ends the loop after that many iterations in this call (used to test resumption). A resume
    compares `config` with the run's recorded config.json: changes that alter what the run trains are refused
    unless `allow_config_change` (see `config_checks.resume_changes`); the others are recorded.
    """
    check_values(config)
    os.makedirs(workdir, exist_ok=True)
    recorded_changes = _check_resume_config(config, workdir, allow_config_change)
    lock = WorkdirLock(workdir)
    try:
        return _train_locked(config, workdir, stop_after, devices, recorded_changes)
    finally:
        lock.release()


def _train_locked(config, workdir: str, stop_after: int | None, devices, recorded_changes: list[str]) -> dict:
    run = build_run(config, devices)
    c, m = config, run.models
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.train.ckpt_every, keep=c.train.keep)
    position, start = 0, 0
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.state)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        run.state, extra = restored
        position, start = extra["data_position"], int(extra["step"])
        if start > c.train.steps:
            raise ValueError(f"{ckpt.directory} holds step {start}, beyond train.steps={c.train.steps}: the run "
                             f"already went further (nothing trained or exported); raise train.steps to go on")
        saved_on = extra.get("process_count", jax.process_count())
        note = "" if saved_on == jax.process_count() else (
            f" (saved by {saved_on} processes, resumed by {jax.process_count()}: every source's global batch "
            "is a function of (seed, step) alone, so the data order is unchanged)")
        print(f"resumed from step {start} in {ckpt.directory}{note}", file=sys.stderr)
    local = [d for d in run.mesh.devices.flat if d.process_index == jax.process_index()]
    source = make_source(c, m.schedule, run.transformer_config, position, devices=local)
    uncond = {k: jax.device_put(np.asarray(v, np.float32), sharding.replicated(run.mesh))
              for k, v in source.uncond().items()}
    fns = compile_iterations(run, source)
    if jax.process_index() == 0:
        _record_config(c, workdir, start, recorded_changes)
        print(f"base params {count_params(run.base):,}; trainable student LoRA {count_params(run.state['student']):,}; "
              f"mesh {dict(run.mesh.shape)}; {jax.process_count()} processes", file=sys.stderr)
    writer = MetricsWriter(workdir, start)
    validate = _make_validation(run, source, workdir, writer)
    evaluate = None
    if c.eval.every > 0:
        from swd_jax.train.evaluation import TrainingEvaluator
        evaluate = TrainingEvaluator(run)
    n = batches_per_iteration(m.loss)
    end = c.train.steps if stop_after is None else min(c.train.steps, start + stop_after)
    from tqdm.auto import tqdm
    bar = tqdm(total=c.train.steps, initial=start, desc="SwD", disable=jax.process_index() != 0)
    pending, last, t_last = None, {}, time.perf_counter()
    state, compiled = run.state, {}
    try:
        for step in range(start, end):
            k = m.schedule.interval(step)
            batches = to_device(run, source.batches(k, n))
            with jax.set_mesh(run.mesh):
                if k not in compiled:  # ahead of its first use, with a line saying so (cached across runs)
                    compiled[k] = _compile(fns[k], k, m.schedule, (state, run.base, batches, uncond), bar)
                    distributed.barrier(f"compiled interval {k}")  # every process compiled: no collective waits
                state, metrics = compiled[k](state, run.base, batches, uncond)
            if pending is not None:  # read step-1's metrics while `step` runs
                last = _log(pending, writer, bar, ckpt, t_last, c)
                t_last = time.perf_counter()
            pending = (step + 1, metrics, k, source.position)
            if (step + 1) % c.train.ckpt_every == 0 or step + 1 == end:
                if pending is not None:  # never save a state whose losses were not checked
                    last = _log(pending, writer, bar, ckpt, t_last, c)
                    t_last, pending = time.perf_counter(), None
                ckpt.save(step + 1, state, {"step": step + 1, "data_position": source.position,
                                            "process_count": jax.process_count()}, force=True)
            if validate and ((step + 1) % c.train.sample_every == 0 or step + 1 == c.train.steps):
                validate(step + 1, state)
            if evaluate is not None and evaluate.due(step + 1):
                writer.write(step + 1, evaluate(step + 1, state))
        if pending is not None:
            last = _log(pending, writer, bar, ckpt, t_last, c)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    run.state = state
    if c.train.export_peft and end == c.train.steps:
        _export(run, workdir)
    return last


def _compile(fn, k: int, schedule, args, bar):
    """fn lowered and compiled for these arguments, announced on the progress bar's line with its time."""
    t0 = time.perf_counter()
    bar.write(f"compiling scale interval {k} (latent {schedule.scale(k)}; first time only, cached on disk)...",
              file=sys.stderr)
    out = fn.lower(*args).compile()
    bar.write(f"compiled scale interval {k} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def _check_resume_config(c, workdir: str, allow: bool) -> list[str]:
    """Refuse a resume whose config changes what the run trains (unless allowed); the harmless changes."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable recorded config ({e}); move it away to start a new run there") from None
    refused, allowed = resume_changes(recorded, c)
    if refused and not allow:
        raise ValueError(f"{workdir} holds a run with another config; these changes alter what it trains: "
                         f"{'; '.join(refused)}. Use a new --workdir, or pass --allow-config-change to resume anyway")
    return refused + allowed


def _record_config(c, workdir: str, start: int, changes: list[str]) -> None:
    """config.json = the config in force; config_history.jsonl keeps every change made on a resume."""
    if changes:
        with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
            f.write(json.dumps({"resumed_at_step": start, "changes": changes}) + "\n")
        print(f"resuming with config changes: {'; '.join(changes)}", file=sys.stderr)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def _log(pending, writer, bar, ckpt, t_last, c) -> dict:
    step, metrics, k, position = pending
    metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
    _check_finite(step, metrics, ckpt)
    dt = time.perf_counter() - t_last
    metrics.update({"interval": k, "data_position": position, "step_time_s": dt, "lr": c.optim.lr,
                    "lr_fake": c.optim.lr_fake,
                    "images_per_s": c.train.batch_size * batches_per_iteration(loss_config(c)) / max(dt, 1e-9)})
    bar.update(1)
    if step % c.train.log_every == 0 or step == c.train.steps:
        writer.write(step, metrics)
        bar.set_postfix({k2: f"{metrics[k2]:.4g}" for k2 in ("fake/loss", "gen/loss") if k2 in metrics})
    return metrics


def _make_validation(run: Run, source, workdir: str, writer: MetricsWriter):
    """A function (step, state) -> None: the student's samples as samples/step_N.png and in TensorBoard (process 0)."""
    c = run.config
    if c.train.sample_every <= 0 or jax.process_index() != 0:
        return None
    from swd_jax.train.validation import StudentSampler, image_grid, save_png, source_vae_folder
    decode = None
    vae_dir = source_vae_folder(c.model.source, c.model.path)
    if c.data.kind != "digits" and vae_dir:
        from swd_jax.convert.vae import load_vae
        from swd_jax.models.vae import decode_latents
        vae, vae_params = load_vae(vae_dir)
        decode = lambda x: decode_latents(vae, vae_params, x)
    elif c.data.kind != "digits":
        print("validation grids show latent channels 0-2: no vae/ in model.path nor beside the converted "
              "checkpoint's source transformer", file=sys.stderr)
        decode = lambda x: x[..., :3] / 3.0
    sampler = StudentSampler(run.models.transformer, run.models.schedule, run.transformer_config.latent_channels,
                             decode, guidance=run.models.guidance)
    cond = {k: jax.device_put(v) for k, v in source.validation_cond(c.train.num_samples).items()}

    def validate(step: int, state):
        images = sampler(run.base, state["student"], cond, seed=c.train.seed)
        grid = image_grid(images)
        save_png(os.path.join(workdir, "samples", f"step_{step:06d}.png"), grid)
        writer.image("samples", grid, step)

    return validate


def _export(run: Run, workdir: str):
    """The trained student LoRA as a PEFT adapter folder plus its diffusers LoRA file (`pipe.load_lora_weights`).

    Every process takes part in gathering the (possibly cross-process sharded) LoRA; process 0 writes it.
    """
    from swd_jax.convert.peft_lora import export_diffusers_lora, export_peft
    student = run.state["student"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        student = multihost_utils.process_allgather(student, tiled=True)
    if jax.process_index() != 0:
        return
    student = jax.device_get(student)
    out = os.path.join(workdir, "student_peft")
    export_peft(student, run.models.transformer.lora, out, cfg=run.transformer_config, overwrite=True)
    export_diffusers_lora(student, run.models.transformer.lora, out, cfg=run.transformer_config,
                          overwrite=True)  # pytorch_lora_weights.safetensors: pipe.load_lora_weights(out) reads it
    print(f"student LoRA exported to {out}", file=sys.stderr)
