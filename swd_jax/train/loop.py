"""SwD training: `python -m swd_jax.train --config configs/tiny.py --workdir DIR [--config.train.lr=...]`.

The loop dispatches iteration N before it reads iteration N-1's metrics (the host never stalls the device),
compiles one program per scale interval ahead of use, checkpoints asynchronously (student, fake, head, both
optimiser states, step, PRNG key, data position; never the frozen base), resumes from the latest checkpoint
automatically, stops with a clear error on a non-finite loss, and exports the student LoRA as a PEFT adapter.
Several processes (a TPU slice, or `launch/local_multiprocess.sh`) run the same loop, each feeding its own
share of every global batch; `swd_jax.train.distributed` connects them first.

The workdir may be local or `gs://` (`swd_jax.storage`; only process 0 writes the run's own files, see
`swd_jax.train.workdir`). Robustness: the workdir is leased (`<workdir>/.lock`, process 0; a second run stops
naming the first one's pid and host); a SIGTERM or SIGINT (a preemption notice) stops every process at one
agreed step, checkpoints it and raises `Preempted` (exit 75; `swd_jax.train.preemption`); a state is saved only if every array is finite; a checkpoint this run saved whose next iteration gives a
non-finite loss is moved aside (`<step>.nonfinite`), while a divergence right after a resume names what changed
on the resume and moves nothing (`_check_finite`); a broken step is moved aside as `<step>.corrupt` and the run
resumes from the one before; a run never starts over silently while steps exist (`--restart-from-scratch`);
`metrics.jsonl` holds each step once (a resume drops the rows after its checkpoint; a deleted file is
recreated). After a kill (any moment: compile, mid-step, inside a save) a rerun resumes from the latest
complete checkpoint and ends bitwise equal to an uninterrupted run.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from swd_jax import storage
from swd_jax.train import distributed, sharding
from swd_jax.train.checkpoint import Checkpointer
from swd_jax.train.config_checks import check_values, resume_changes
from swd_jax.train.preemption import Preempted, PreemptionWatch
from swd_jax.train.progress import Progress
from swd_jax.train.setup import Run, build_run, count_params, interval_models, loss_config
from swd_jax.train.sources import check_data, make_source
from swd_jax.train.steps import batches_per_iteration, make_iteration
from swd_jax.train.workdir import (MetricsWriter, WorkdirInUse, WorkdirLease, WorkdirLock,  # noqa: F401
                                   check_resume_config as _check_resume_config, record_config as _record_config)


def compile_iterations(run: Run, source) -> dict:
    """One jitted program per scale interval: (state, base, batches, uncond) -> (state, metrics), state donated;
    intervals below `model.remat_from_scale` without remat (`setup.interval_models`)."""
    mesh, m = run.mesh, run.models
    data_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    rep = sharding.replicated(mesh)
    fns = {}
    for k in range(m.schedule.num_intervals):
        fns[k] = jax.jit(make_iteration(interval_models(run, k), k),
                         in_shardings=(run.state_shardings, run.base_shardings, data_sharding, rep),
                         out_shardings=(run.state_shardings, rep), donate_argnums=(0,))
    return fns


def to_device(run: Run, host_batches: dict) -> dict:
    """Host-local numpy batches [n, B_host, ...] -> global arrays sharded over data x fsdp on axis 1."""
    s = sharding.batch_sharding(run.mesh, leading_axes=1)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v, np.float32)) for k, v in host_batches.items()}


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer):
    """Stop on a non-finite loss, with one line naming the likely cause; set aside only what this run produced.

    The rule: iteration `step` is computed from the state of step - 1. If THIS run saved that checkpoint (it was
    finite, and the very next iteration from it diverged under this run's settings) it is moved aside as
    `<step-1>.nonfinite`, so a rerun resumes from the one before. A checkpoint this run resumed from is never
    moved: it was saved finite and passed its checksums, so a divergence after a resume blames what changed on
    the resume (named: 'optim.lr changed from 0.001 to 1e+30 on this resume') and a rerun without the change
    resumes from it.
    """
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if not bad:
        return
    from swd_jax.train.config_checks import training_changes
    ckpt.wait_until_finished()
    src, note, advice = step - 1, "", "Lower the learning rate or check the data."
    if src in ckpt.saved_steps:
        moved = ckpt.quarantine(src, f"iteration {step} from this state gave non-finite losses {bad}")
        note = f" Checkpoint {src}, which gave it, was moved to {moved}." if moved else ""
    elif ckpt.restored_step is not None and not ckpt.saved_steps:
        first = "the first iteration" if src == ckpt.restored_step else "an iteration"
        note = (f" It is {first} after resuming from step {ckpt.restored_step}, which is kept (saved finite, "
                "checksums verified)")
        changes = [f"{line.split(':', 1)[0]} changed from {line.split(': ', 1)[1].replace(' -> ', ' to ', 1)}"
                   for line in training_changes(ckpt.resume_changes)]
        if changes:
            note += f"; likely cause: {'; '.join(changes)} on this resume."
            advice = f"Rerun without the change to go on from step {ckpt.restored_step}."
        else:
            note += "; nothing in the config changed on this resume."
    raise FloatingPointError(f"non-finite loss at step {step}: {bad}. Stopped.{note} "
                             f"{ckpt.last_good_message()} {advice}")


def train(config, workdir: str, *, stop_after: int | None = None, devices=None,
          allow_config_change: bool = False) -> dict:
    """Run (or resume) the SwD distillation described by `config`; returns the last logged metrics.

    `stop_after` ends the loop after that many iterations in this call (used to test resumption). A resume
    compares `config` with the run's recorded config.json: changes that alter what the run trains are refused
    unless `allow_config_change` (see `config_checks.resume_changes`); the others are recorded.
    """
    check_values(config)
    check_data(config)  # bad data fails here, in milliseconds, before any model is built
    workdir = storage.resolve(workdir)
    created = jax.process_index() == 0 and not storage.exists(workdir)
    if jax.process_index() == 0:
        storage.makedirs(workdir)
    recorded_changes = _check_resume_config(config, workdir, allow_config_change)
    lease = WorkdirLease(workdir)
    ok = False
    try:
        out = _train_locked(config, workdir, stop_after, devices, recorded_changes, lease)
        ok = True
        return out
    finally:
        lease.release()
        if not ok and created and storage.listdir(workdir) in ([], [".lock"]):
            storage.remove_tree(workdir)  # a failed start leaves no empty workdir behind


def _train_locked(config, workdir: str, stop_after: int | None, devices, recorded_changes: list[str],
                  lease: WorkdirLease) -> dict:
    run = build_run(config, devices)
    c, m = config, run.models
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), save_every=c.train.ckpt_every, keep=c.train.keep)
    position, start = 0, 0
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.state)
    to_stored, from_stored = _stored_layout(run)
    ckpt.resume_changes = list(recorded_changes)  # named if the first iterations after the resume diverge
    restored = ckpt.restore_latest(run.unrolled(abstract), restart=bool(c.train.get("restart_from_scratch", False)))
    if restored is not None:
        stored_state, extra = restored
        run.state = from_stored(stored_state)
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
    bar = Progress(c.train.steps, start, "SwD", disable=jax.process_index() != 0)  # its ETA leaves compiles out
    pending, last, t_last = None, {}, time.perf_counter()
    state, compiled, saved, preempted_at = run.state, {}, start, None
    watch = PreemptionWatch().__enter__()
    try:
        for step in range(start, end):
            if watch.reached(step):  # a preemption notice: every process stops here and saves this step
                preempted_at = step
                break
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
                _save(ckpt, step + 1, to_stored(state), source, writer, lease)
                saved = step + 1
            if validate and ((step + 1) % c.train.sample_every == 0 or step + 1 == c.train.steps):
                validate(step + 1, state)
            if evaluate is not None and evaluate.due(step + 1):
                writer.write(step + 1, evaluate(step + 1, state))
        if pending is not None:
            last = _log(pending, writer, bar, ckpt, t_last, c)
        if preempted_at is not None and saved != preempted_at:
            _save(ckpt, preempted_at, to_stored(state), source, writer, lease)
    finally:
        watch.__exit__()
        bar.close()
        writer.close()
        ckpt.close()
    run.state = state
    if preempted_at is not None:
        took = watch.seconds_since_signal()
        raise Preempted(preempted_at, f"preempted ({watch.signal_name or 'SIGTERM'}): checkpoint step "
                        f"{preempted_at} saved in {ckpt.directory}" + (f" {took:.1f} s after the signal" if took
                                                                       else "") + "; rerun the same command to resume")
    if c.train.export_peft and end == c.train.steps:
        _export(run, workdir)
    return last


def _stored_layout(run: Run):
    """(to_stored, from_stored): the run's state to and from the unrolled layout checkpoints hold (identity unless
    blocks are scanned), so a checkpoint does not depend on `model.scan_blocks`."""
    if all(g.size == 1 for g in run.block_groups):
        return (lambda s: s), (lambda s: s)
    to_stored = jax.jit(run.unrolled, out_shardings=run.unrolled(run.state_shardings))
    from_stored = jax.jit(run.stacked, out_shardings=run.state_shardings)  # new shapes: nothing to donate
    return to_stored, from_stored


def _save(ckpt: Checkpointer, step: int, state, source, writer: MetricsWriter, lease: WorkdirLease) -> None:
    """Checkpoint `step` (asynchronously), after checking the workdir is still this run's; upload the metrics."""
    lease.check()
    ckpt.save(step, state, {"step": step, "data_position": source.position, "process_count": jax.process_count()},
              force=True)
    writer.sync()


def _compile(fn, k: int, schedule, args, bar):
    """fn lowered and compiled for these arguments, announced on the progress bar's line with its time."""
    t0 = time.perf_counter()
    bar.write(f"compiling scale interval {k} (latent {schedule.scale(k)}; first time only, cached on disk)...",
              file=sys.stderr)
    with bar.compiling(f"scale interval {k}"):
        out = fn.lower(*args).compile()
    bar.write(f"compiled scale interval {k} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


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
    from swd_jax.image_files import image_grid, save_png
    from swd_jax.train.validation import StudentSampler, source_vae_folder
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
        save_png(os.path.join(writer.folder, "samples", f"step_{step:06d}.png"), grid)  # uploaded by sync
        writer.image("samples", grid, step)

    return validate


def _export(run: Run, workdir: str):
    """The trained student LoRA as a PEFT adapter folder plus its diffusers LoRA file (`pipe.load_lora_weights`).

    Every process takes part in gathering the (possibly cross-process sharded) LoRA; process 0 writes it.
    """
    from swd_jax.convert.peft_lora import export_diffusers_lora, export_peft
    student = run.unrolled_arrays(run.state["student"])  # PEFT and diffusers name every block
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        student = multihost_utils.process_allgather(student, tiled=True)
    if jax.process_index() != 0:
        return
    student = jax.device_get(student)
    out = storage.Staged(storage.join(workdir, "student_peft"))  # written locally, uploaded to a gs:// workdir
    export_peft(student, run.models.transformer.lora, out.path, cfg=run.transformer_config, overwrite=True)
    export_diffusers_lora(student, run.models.transformer.lora, out.path, cfg=run.transformer_config,
                          overwrite=True)  # pytorch_lora_weights.safetensors: pipe.load_lora_weights(out) reads it
    out.close()
    print(f"student LoRA exported to {out.destination}", file=sys.stderr)
