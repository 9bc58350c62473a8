"""Several processes on this host: 2 processes x 4 CPU devices train, are killed, resume, and match 1 x 8."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from swd_jax.train.checkpoint import Checkpointer
from swd_jax.train.loop import train
from tests.test_train import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps visit both scale intervals twice; a checkpoint every 2; the global batch of 8 is split 4 + 4.
RUN = {"train.steps": 4, "train.ckpt_every": 2, "train.log_every": 1, "mesh.shape": [2, 4, 1]}


def process_env(devices: int, **extra) -> dict:
    """The environment of a child trainer: `devices` CPU devices, this tree's code, the tests' compile cache."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               SWD_TEST_CACHE=jax.config.jax_compilation_cache_dir or "",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env.update(extra)
    return env


def start_processes(workdir, overrides: dict, n: int, devices: int, extra_env: dict | None = None
                    ) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.join(ROOT, "tests", "train_process.py"), str(workdir), json.dumps(overrides)]
    return [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=process_env(devices, SWD_COORDINATOR=f"localhost:{port}",
                                             SWD_NUM_PROCESSES=str(n), SWD_PROCESS_ID=str(i), **(extra_env or {})))
            for i in range(n)]


def wait_all(procs, timeout=400) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def kill_when(procs, ready, timeout=400, poll_s=0.02):
    """SIGKILL every process as soon as `ready()` holds."""
    t0 = time.time()
    while not ready():
        assert time.time() - t0 < timeout and all(p.poll() is None for p in procs), [
            p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
        time.sleep(poll_s)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def final_lora(workdir, step=4) -> dict:
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=2, keep=3) as c:
        state, extra = c.read(step)
    return {"student": state["student"], "fake": state["fake"], "extra": extra}


def assert_lora_close(a, b, rtol=1e-5, atol=1e-6):
    """LoRA values are ~1e-3 and one Adam step moves them ~1e-3 (lr): atol 1e-6 is 1/1000 of a step. The
    processes' all-reduces add in another order than one process's (measured: max 1.4e-7 absolute)."""
    for name in ("student", "fake"):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a[name]), jax.tree.leaves(b[name])):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol, err_msg=name + jax.tree_util.keystr(path))


def test_multihost_training_killed_and_resumed_equals_one_process(tmp_path):
    work = tmp_path / "two_processes"
    procs = start_processes(work, RUN, n=2, devices=4)
    kill_when(procs, lambda: os.path.isdir(work / "checkpoints" / "2"))  # both killed after the first save
    assert not os.path.isdir(work / "checkpoints" / "4")
    wait_all(start_processes(work, RUN, n=2, devices=4))  # resumed as 2 processes

    ref = tmp_path / "one_process"
    train(small_config(**{**RUN, "mesh.shape": (2, 4, 1)}), str(ref), devices=jax.devices())
    want, got = final_lora(ref), final_lora(work)
    assert_lora_close(want, got)
    assert got["extra"]["data_position"] == want["extra"]["data_position"] == 4 * 3 * 8

    # Data positions, one row per step: every example consumed once, in order, across the kill.
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["data_position"] for r in rows] == [24, 48, 72, 96]

    # A different process count resumes exactly: 1 process x 8 devices from the 2-process checkpoint 2.
    other = tmp_path / "resumed_on_one_process"
    os.makedirs(other / "checkpoints")
    shutil.copytree(work / "checkpoints" / "2", other / "checkpoints" / "2")
    train(small_config(**{**RUN, "mesh.shape": (2, 4, 1)}), str(other), devices=jax.devices())
    assert_lora_close(want, final_lora(other))


def test_multihost_hosts_feed_disjoint_halves_of_each_global_batch():
    from swd_jax.demo.digits_source import DigitsSource
    from swd_jax.method.schedule import ScaleSchedule
    schedule = ScaleSchedule(scales=(8, 16), boundaries=(0, 14, 28), num_train_steps=28, shift=3.0)
    one = DigitsSource(schedule, 32, 16, global_batch=8, seed=0)
    hosts = [DigitsSource(schedule, 32, 16, global_batch=8, seed=0) for _ in range(2)]
    for h, src in enumerate(hosts):
        src.n_hosts, src.host = 2, h
    for _ in range(3):
        whole = one.batches(0, 2)["x"]
        halves = [src.batches(0, 2)["x"] for src in hosts]
        np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
    assert one.position == hosts[0].position == 48


def test_multihost_record_loader_gives_the_same_global_batches_on_any_host_count(tmp_path):
    from swd_jax.train.records import make_loader, write_array_records
    f = str(tmp_path / "rows.array_record")
    write_array_records(f, [{"id": np.int32(i)} for i in range(13)])
    one = make_loader(f, 6, seed=4, shard_index=0, shard_count=1)
    two = [make_loader(f, 3, seed=4, shard_index=h, shard_count=2, start_position=2) for h in range(2)]
    whole = [next(one)["id"] for _ in range(6)]  # 36 examples: almost 3 epochs
    halves = [np.concatenate([next(loader)["id"] for loader in two]) for _ in range(4)]
    for k in range(4):  # the 2-host run resumed at batch 2 reads exactly global batches 2..5 of the 1-host run
        np.testing.assert_array_equal(halves[k], whole[k + 2])
    epoch0 = np.concatenate(whole)[:13]
    assert sorted(epoch0.tolist()) == list(range(13))  # nothing skipped or repeated within an epoch


FAILING_PROCESS = """
import os, sys
from swd_jax.cli.common import run_main
def run():
    from swd_jax.train import distributed
    distributed.initialize()
    distributed.barrier("connected")
    if os.environ["SWD_PROCESS_ID"] == "1":
        raise FileNotFoundError("no data at /nowhere")
    distributed.barrier("compiled", timeout_s=600)
sys.exit(run_main(run))
"""


def test_multihost_one_process_fails_the_others_stop_at_once_naming_it():
    """Before: the failing process sat in jax's shutdown barrier (5 min) and the others in ours (1 h)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", FAILING_PROCESS], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=process_env(1, SWD_COORDINATOR=f"localhost:{port}", SWD_NUM_PROCESSES="2",
                                              SWD_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.time() - t0 < 90
    assert procs[1].returncode == 2 and "error: no data at /nowhere" in outs[1], outs[1][-2000:]
    assert procs[0].returncode == 1, outs[0][-2000:]
    assert "error: stopping: process 1 failed: FileNotFoundError: no data at /nowhere" in outs[0], outs[0][-2000:]
