"""SIGKILL the trainer during compile, mid-iteration and inside a checkpoint save: every rerun resumes from the
latest complete checkpoint and the run ends bitwise equal (CPU) to an uninterrupted one."""
import glob
import json
import os

import jax
import numpy as np

from tests.test_multihost import final_lora, kill_when, start_processes, wait_all

# 6 steps, a checkpoint every 2, one CPU device per process (a fresh process compiles from the shared cache).
RUN = {"train.steps": 6, "train.ckpt_every": 2, "train.log_every": 1, "mesh.shape": [1, 1, 1]}
TIMING = ("step_time_s", "images_per_s")


def one(workdir):
    return start_processes(workdir, RUN, n=1, devices=1)


def metrics(workdir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(workdir / "metrics.jsonl")]


def test_crash_at_any_moment_then_rerun_equals_uninterrupted(tmp_path):
    ref, work = tmp_path / "uninterrupted", tmp_path / "killed"
    wait_all(one(ref))
    ckpts = work / "checkpoints"
    # 1. during compile: the loop has not written a metrics row yet
    kill_when(one(work), lambda: os.path.exists(work / "config.json"))
    assert not os.path.exists(work / "metrics.jsonl") or not metrics(work)
    # 2. mid-iteration: between checkpoints (step 3 logged, checkpoint 4 not yet written)
    kill_when(one(work), lambda: os.path.exists(work / "metrics.jsonl") and len(metrics(work)) >= 3)
    # 3. inside a save: as soon as orbax's temporary step folder exists; retried until a kill lands there
    landed = False
    for _ in range(5):
        procs = one(work)
        kill_when(procs, lambda: glob.glob(str(ckpts / "*.orbax-checkpoint-tmp*")) or procs[0].poll() is not None,
                  poll_s=0.001)
        landed = procs[0].returncode == -9 and bool(glob.glob(str(ckpts / "*.orbax-checkpoint-tmp*")))
        if landed or os.path.isdir(ckpts / "6"):
            break
    assert landed, "no kill landed inside a save"
    wait_all(one(work))  # the final rerun

    want, got = final_lora(ref, step=6), final_lora(work, step=6)
    for name in ("student", "fake"):
        for x, y in zip(jax.tree.leaves(want[name]), jax.tree.leaves(got[name])):
            np.testing.assert_array_equal(y, x)
    assert got["extra"] == want["extra"]
    assert metrics(work) == metrics(ref)  # each step once, same values
