"""The pod job against a local Cloud Storage emulator: a gs:// workdir, the lease, and preemption (SIGTERM).

2 processes x 4 CPU devices train with a gs:// workdir; one is sent SIGTERM mid-run; every process saves the
same agreed step and exits 75; the rerun finishes, equal to an uninterrupted local 1-process run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from swd_jax import storage
from swd_jax.train.loop import train
from swd_jax.train.preemption import PREEMPTED_EXIT
from swd_jax.train.workdir import WorkdirInUse, WorkdirLease
from tests.gcs_emulator import emulator_env, gcs_bucket, gcs_emulator  # noqa: F401
from tests.test_multihost import ROOT, assert_lora_close, final_lora, process_env, start_processes
from tests.test_train import small_config

# 8 steps alternate the two scale intervals; a checkpoint every 4, so a preemption lands between two.
RUN = {"train.steps": 8, "train.ckpt_every": 4, "train.log_every": 1, "mesh.shape": [2, 4, 1]}


def _steps(workdir) -> list[int]:
    return sorted(int(n) for n in storage.listdir(storage.join(workdir, "checkpoints")) if n.isdigit())


def test_lease_on_gcs_refuses_a_second_run_naming_the_holder_and_takes_over_a_stale_one(gcs_bucket, capsys):
    work = gcs_bucket + "/run"
    first = WorkdirLease(work, stale_s=2, renew_s=0.5)
    with pytest.raises(WorkdirInUse, match=rf"in use by pid {os.getpid()} on .*renewed \d+ s ago"):
        WorkdirLease(work, stale_s=2)
    first._stop.set()  # the holder dies without releasing: its lease goes stale
    first._thread.join()
    time.sleep(2.5)
    second = WorkdirLease(work, stale_s=2, renew_s=0.5)
    assert "taking over" in capsys.readouterr().err
    # The old holder, were it alive, would find its lease taken at its next renewal and stop.
    from google.api_core.exceptions import PreconditionFailed
    with pytest.raises(PreconditionFailed):
        first._blob.upload_from_string("x", if_generation_match=first._generation)
    second.release()
    assert not storage.exists(work + "/.lock")
    WorkdirLease(work).release()  # free again


def test_single_process_sigterm_saves_the_step_and_exits_75(gcs_bucket):
    work = gcs_bucket + "/single"
    run = {**RUN, "train.steps": 40, "mesh.shape": [1, 1, 1]}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "train_process.py"), work, json.dumps(run)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=process_env(1, **emulator_env()))
    t0 = time.time()
    while 4 not in _steps(work):  # after the first checkpoint: compiled, mid-run
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()[0][-3000:]
        time.sleep(0.2)
    t_signal = time.time()
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    took = time.time() - t_signal
    assert p.returncode == PREEMPTED_EXIT, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("preempted (SIGTERM): checkpoint step")]
    assert len(line) == 1 and "rerun the same command to resume" in line[0], out[-3000:]
    step = int(line[0].split("checkpoint step ")[1].split()[0])
    assert step in _steps(work) and 4 < step < 40
    assert "Traceback" not in out
    print(f"SIGTERM -> checkpoint {step} saved on gs:// and exit: {took:.1f} s ({line[0]})")


def test_two_processes_gcs_workdir_sigterm_one_then_rerun_equals_uninterrupted_local_run(gcs_bucket, tmp_path):
    work = gcs_bucket + "/pod"
    env = emulator_env()
    procs = start_processes(work, RUN, n=2, devices=4, extra_env=env)
    t0 = time.time()
    while 4 not in _steps(work):
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 400, [
            p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
        time.sleep(0.2)
    # A second run on the same gs:// workdir is refused, naming the holder (process 0 of the running pair).
    with pytest.raises(WorkdirInUse, match=r"is in use by pid \d+ on "):
        train(small_config(**{**RUN, "mesh.shape": (2, 4, 1)}), work)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT] * 2, [o[-3000:] for o in outs]
    saved = _steps(work)
    assert saved[-1] < 8, saved  # stopped early, at one agreed step
    assert "preempted" in outs[0] and "rerun the same command" in outs[0]

    procs = start_processes(work, RUN, n=2, devices=4, extra_env=env)
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert f"resumed from step {saved[-1]}" in outs[0]

    ref = tmp_path / "one_process"
    train(small_config(**{**RUN, "mesh.shape": (2, 4, 1)}), str(ref), devices=jax.devices())
    want, got = final_lora(ref, step=8), final_lora(work, step=8)
    assert_lora_close(want, got)
    assert got["extra"]["data_position"] == want["extra"]["data_position"]
    rows = [json.loads(x) for x in storage.read_text(work + "/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one row per step across the preemption
    assert storage.exists(work + "/config.json") and not storage.exists(work + "/.lock")
