"""Several processes, one of them fails or is killed: every other one ends within 30 s with one `error:` line
that names it, and no traceback or C++ stack on its console (`swd_jax.train.distributed`, `.supervisor`)."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.test_multihost import ROOT, RUN, process_env, start_processes

LONG_RUN = {**RUN, "train.steps": 1000, "train.ckpt_every": 1000}  # still training when killed


class Output:
    """A child's merged stdout/stderr, read as it comes (a full pipe would block the child)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.text = proc, ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.text += line

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=5)
        return self.text


def wait_for(procs, ready, timeout=300, poll_s=0.05) -> None:
    t0 = time.time()
    while not ready():
        assert time.time() - t0 < timeout and all(p.poll() is None for p in procs), "not ready in time"
        time.sleep(poll_s)


def training(workdir) -> bool:
    """Process 0 wrote the first metrics row: every process is past compiling, inside the steps."""
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and os.path.getsize(path) > 0


def assert_one_error_line(out: str, *words: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    for native in ("Traceback", "*** Check failure", "    @ 0x", "terminate called", "client.h"):
        assert native not in out, out[-3000:]
    return errors[0]


def kill_and_time(procs, outputs, victim: int, workdir) -> tuple[float, list[str]]:
    """SIGKILL process `victim` once training runs; how long until every other process ended, and outputs."""
    wait_for(procs, lambda: training(workdir))
    t0 = time.time()
    procs[victim].send_signal(signal.SIGKILL)
    outs = [o.wait(timeout=60) for o in outputs]
    return time.time() - t0, outs


def test_peers_process_1_killed_process_0_stops_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SWD_PEER_TIMEOUT_S", "5")  # the children's; with the default 15 s: 15.5 s measured
    procs = start_processes(tmp_path, LONG_RUN, n=2, devices=4)
    outputs = [Output(p) for p in procs]
    try:
        took, outs = kill_and_time(procs, outputs, 1, tmp_path)
    finally:
        for p in procs:
            p.kill()
    print(f"process 1 killed -> process 0 stopped: {took:.1f} s")
    assert took < 30 and procs[0].returncode == 1, outs[0][-3000:]
    print(assert_one_error_line(outs[0], "process 1", "stopped responding for 5 s"))


def test_peers_process_0_killed_process_1_stops_naming_it(tmp_path):
    """Through the console command: process 1's supervisor keeps jax's C++ abort off the console."""
    config = tmp_path / "config.py"
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in LONG_RUN.items()}
    config.write_text(f"from tests.test_train import small_config\n\n\ndef get_config():\n"
                      f"    return small_config(**{fields!r})\n")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "swd_jax.train", "--config", str(config), "--workdir", str(work)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=process_env(4, SWD_COORDINATOR=f"localhost:{port}", SWD_NUM_PROCESSES="2",
                                              SWD_PROCESS_ID=str(i), SWD_NATIVE_LOG_DIR=str(tmp_path),
                                              SWD_COMPILE_CACHE=process_env(4)["SWD_TEST_CACHE"] or "off"))
             for i in range(2)]
    outputs = [Output(p) for p in procs]
    try:
        took, outs = kill_and_time(procs, outputs, 0, work)
    finally:
        for p in procs:
            p.kill()
    print(f"process 0 killed -> process 1 stopped: {took:.1f} s")
    assert took < 30 and procs[1].returncode == 1, outs[1][-3000:]
    line = assert_one_error_line(outs[1], "process 0", f"localhost:{port}")
    print(line)
    if "native log:" in line:  # the C++ abort came first: its stack is in the log
        assert "Check failure" in open(tmp_path / "swd_native_process1.log").read()


FAILS_IN_A_COLLECTIVE = """
import os, sys
import numpy as np
from swd_jax.cli.common import run_main
def run():
    from jax.experimental import multihost_utils
    from swd_jax.train import distributed
    distributed.initialize()
    distributed.barrier("connected")
    if os.environ["SWD_PROCESS_ID"] == "1":
        raise FileNotFoundError("no data at /nowhere")
    multihost_utils.process_allgather(np.ones(3))  # a gloo AllGather whose peer is gone
sys.exit(run_main(run))
"""


def test_peers_process_1_fails_process_0_in_a_collective_stops_naming_it():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", FAILS_IN_A_COLLECTIVE], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=process_env(1, SWD_COORDINATOR=f"localhost:{port}", SWD_NUM_PROCESSES="2",
                                              SWD_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    print(f"process 1 failed -> both stopped: {time.time() - t0:.1f} s (with start-up)")
    assert procs[1].returncode == 2, outs[1][-3000:]
    assert_one_error_line(outs[1], "error: no data at /nowhere")
    assert procs[0].returncode == 1, outs[0][-3000:]
    assert_one_error_line(outs[0], "error: stopping: process 1 failed: FileNotFoundError: no data at /nowhere")
