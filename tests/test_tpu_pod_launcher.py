"""launch/tpu_pod.sh against a fake gcloud (tests/fake_gcloud/gcloud): the exact gcloud calls of each path.

The fake records every call and plays a scripted slice (state.json: its state, the states after a create, the
training ssh's exit codes, the state after each training run). Nothing here talks to GCP. The worker half,
launch/tpu_worker.sh train, runs for real on this machine with a fake python (logs and exit codes).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
WORKER = os.path.join(REPO_ROOT, "launch", "tpu_worker.sh")
FAKE_BIN = os.path.join(REPO_ROOT, "tests", "fake_gcloud")
ARGS = ["swd-test", "us-east5-a", "v5p-16", "configs/sd35_medium.py", "gs://runs/sd35m",
        "--config.train.batch_size=8"]


def launch(tmp_path, *args: str, state: dict | None = None, plan_check: bool = False, env: dict | None = None):
    """Run the launcher with the fake gcloud first on PATH; (process, calls as argv lists)."""
    (tmp_path / "state.json").write_text(json.dumps(state or {"state": None}))
    run_env = {**os.environ, "PATH": FAKE_BIN + os.pathsep + os.environ["PATH"], "FAKE_GCLOUD_DIR": str(tmp_path),
               "REPO": "https://example.com/swd_jax.git", "SWD_POLL_S": "0", **(env or {})}
    if not plan_check:
        run_env["SWD_SKIP_PLAN_CHECK"] = "1"
    proc = subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True, env=run_env, timeout=60)
    calls_file = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return proc, calls


def verbs(calls: list[list[str]]) -> list[str]:
    """'tpu-vm create', 'queued-resources describe', 'tpu-vm ssh setup', ... of each recorded call."""
    out = []
    for argv in calls:
        verb = " ".join(argv[2:4])
        if argv[3] == "ssh":
            verb += " " + argv[argv.index("--command") + 1].split("tpu_worker.sh ")[1].split()[0]
        out.append(verb)
    return out


def command_of(calls: list[list[str]], mode: str) -> str:
    return next(a[a.index("--command") + 1] for a in calls if a[3] == "ssh" and f"tpu_worker.sh {mode}" in
                a[a.index("--command") + 1])


FRESH = ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train"]


def test_on_demand_happy_path(tmp_path):
    proc, calls = launch(tmp_path, *ARGS, state={"state": None, "after_create": ["CREATING", "READY"]},
                         plan_check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verbs(calls) == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm describe",
                            "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train"]
    create = calls[1]
    assert create[4:] == ["swd-test", "--zone", "us-east5-a", "--accelerator-type", "v5p-16", "--version",
                          "v2-alpha-tpuv5"]
    assert all("--worker=all" in a for a in calls[4:])
    train = command_of(calls, "train")
    assert "gs://runs/sd35m configs/sd35_medium.py --config.model.attention_impl=splash" in train
    assert train.endswith("--config.train.batch_size=8")
    assert "TPU plan for" in proc.stdout  # plan_check.py ran first, for real
    assert "training finished" in proc.stdout


def test_reused_slice_and_runtime_per_generation(tmp_path):
    proc, calls = launch(tmp_path, "n", "z", "v6e-8", "tiny", "/tmp/run", state={"state": "READY"})
    assert proc.returncode == 0, proc.stderr
    assert verbs(calls) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train"]
    for accel, runtime in [("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                           ("v4-32", "tpu-ubuntu2204-base")]:
        proc, _ = launch(tmp_path, "--dry-run", "n", "z", accel, "tiny", "/tmp/run")
        assert f"--version {runtime}" in proc.stdout
    proc, _ = launch(tmp_path, "--dry-run", "n", "z", "v5p-8", "tiny", "/tmp/run", env={"TPU_VERSION": "my-img"})
    assert "--version my-img" in proc.stdout


def test_spot_preempted_is_recreated_and_rerun(tmp_path):
    state = {"state": None, "train_rc": [75, 0], "after_train": ["PREEMPTED"]}
    proc, calls = launch(tmp_path, "--spot", *ARGS, state=state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verbs(calls) == FRESH + ["tpu-vm describe", "tpu-vm describe", "tpu-vm delete"] + FRESH
    assert calls[1][-1] == "--spot" and calls[-5][-1] == "--spot"
    assert calls[1] == calls[-5]  # the same create again
    assert command_of(calls, "train") == calls[-1][calls[-1].index("--command") + 1]  # the same training command
    rerun = [line for line in proc.stdout.splitlines() if line.startswith("tpu_pod: rerun")]
    assert rerun == ["tpu_pod: rerun: the trainer exited 75 and TPU VM swd-test is PREEMPTED: bringing it back"]


def test_exit_75_on_a_healthy_slice_reruns_only_training(tmp_path):
    proc, calls = launch(tmp_path, *ARGS, state={"state": "READY", "train_rc": [75, 0]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verbs(calls) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train",
                            "tpu-vm describe", "tpu-vm describe", "tpu-vm ssh train"]
    assert "preempted (exit 75) and saved a checkpoint" in proc.stdout


def test_queued_resource_polled_until_active_and_suspended_recreated(tmp_path):
    state = {"state": None, "after_create": ["ACCEPTED", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES",
                                             "PROVISIONING", "ACTIVE"],
             "train_rc": [255, 0], "after_train": ["SUSPENDED"]}
    proc, calls = launch(tmp_path, "--queued", "--spot", *ARGS, state=state, env={"QR_ID": "qr-1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    qr = ["queued-resources describe", "queued-resources create"] + ["queued-resources describe"] * 5
    setup = ["tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train"]
    assert verbs(calls) == (qr + setup + ["queued-resources describe", "queued-resources describe",
                                          "queued-resources delete"] + qr + setup)
    assert calls[1][4:] == ["qr-1", "--node-id", "swd-test", "--zone", "us-east5-a", "--accelerator-type", "v5p-16",
                            "--runtime-version", "v2-alpha-tpuv5", "--spot"]
    assert calls[0][-1] == "--format=value(state.state)"
    delete = next(a for a in calls if a[3] == "delete")
    assert delete[4:] == ["qr-1", "--zone", "us-east5-a", "--force", "--quiet"]
    assert proc.stdout.count("is WAITING_FOR_RESOURCES: waiting") == 2  # once per wait, not per poll


def test_user_error_is_not_retried(tmp_path):
    proc, calls = launch(tmp_path, *ARGS, state={"state": "READY", "train_rc": [2]})
    assert proc.returncode == 2
    assert verbs(calls) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train"]
    assert "a user error" in proc.stdout and "not rerunning" in proc.stdout


def test_other_failures_retry_up_to_max_restarts(tmp_path):
    proc, calls = launch(tmp_path, "--max-restarts", "1", *ARGS, state={"state": "READY", "train_rc": [1, 1, 0]})
    assert proc.returncode == 1
    assert verbs(calls) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh setup", "tpu-vm ssh train",
                            "tpu-vm describe", "tpu-vm describe", "tpu-vm ssh train", "tpu-vm describe"]
    assert "restart 1/1: the trainer exited 1" in proc.stdout
    assert "stopping after 1 restarts" in proc.stdout


def test_dry_run_prints_and_calls_nothing(tmp_path):
    proc, calls = launch(tmp_path, "--dry-run", "--queued", "--mount", "gs://data", *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ gcloud")]
    assert [line.split()[4:6] for line in lines] == [["queued-resources", "describe"], ["queued-resources", "create"],
                                                     ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert lines[0] == ("+ gcloud compute tpus queued-resources describe swd-test --zone us-east5-a "
                        "'--format=value(state.state)'")
    assert lines[1].startswith("+ gcloud compute tpus queued-resources create swd-test --node-id swd-test")
    assert "'bash tpu_worker.sh setup https://example.com/swd_jax.git main gs://data'" in lines[3]
    assert "tpu_worker.sh train gs://runs/sd35m" in lines[4]


def test_unknown_accelerator_is_one_line_exit_2(tmp_path):
    proc, calls = launch(tmp_path, "n", "z", "v3-8", "tiny", "/tmp/run")
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0
    assert "unknown accelerator v3-8" in proc.stderr
    assert calls == []


def test_bad_arguments_print_the_usage(tmp_path):
    proc, calls = launch(tmp_path, "n", "z", "v5p-8")
    assert proc.returncode == 2 and "launch/tpu_pod.sh [OPTIONS] NAME ZONE" in proc.stdout and calls == []
    proc, _ = launch(tmp_path, "--mount", "gs://data/sub", *ARGS)
    assert proc.returncode == 2 and "--mount takes a bucket" in proc.stderr


def test_mount_is_in_the_worker_setup(tmp_path):
    proc, calls = launch(tmp_path, "--mount", "gs://data-a", "--mount=gs://data-b", *ARGS, state={"state": "READY"})
    assert proc.returncode == 0, proc.stderr
    setup = command_of(calls, "setup")
    assert setup == "bash tpu_worker.sh setup https://example.com/swd_jax.git main gs://data-a gs://data-b"
    worker = open(WORKER).read()
    assert 'gcsfuse -o ro --implicit-dirs "$bucket" "$dir"' in worker and "dir=/mnt/gcs/$1" in worker


@pytest.fixture
def worker_home(tmp_path):
    """A HOME for launch/tpu_worker.sh: ~/swd_jax and a venv whose python is a script printing two lines."""
    home = tmp_path / "home"
    (home / "swd_jax").mkdir(parents=True)
    bin_dir = home / "swd_venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    python = bin_dir / "python"
    python.write_text('#!/bin/sh\necho "trainer argv: $*"\necho "SWD_DISTRIBUTED=$SWD_DISTRIBUTED"\n'
                      'sleep "${FAKE_TRAIN_S:-0}"\nexit "${FAKE_TRAIN_RC:-0}"\n')
    python.chmod(0o755)
    return home


def worker_env(home, tmp_path, rc=0, seconds=0):
    (tmp_path / "state.json").write_text("{}")
    return {**os.environ, "HOME": str(home), "SWD_WORKER_ID": "3", "FAKE_TRAIN_RC": str(rc),
            "FAKE_TRAIN_S": str(seconds), "PATH": FAKE_BIN + os.pathsep + os.environ["PATH"],
            "FAKE_GCLOUD_DIR": str(tmp_path)}


def run_worker(home, tmp_path, *args, rc=0):
    return subprocess.run(["bash", WORKER, "train", *args], capture_output=True, text=True,
                          env=worker_env(home, tmp_path, rc), timeout=30)


def test_worker_train_logs_to_a_local_workdir(worker_home, tmp_path):
    workdir = tmp_path / "run"
    for rc in (75, 0):
        proc = run_worker(worker_home, tmp_path, str(workdir), "tiny", "--config.a=1", rc=rc)
        assert proc.returncode == rc, proc.stdout + proc.stderr
        assert "trainer argv: -m swd_jax.train --config tiny --workdir" in proc.stdout  # streamed to ssh
    log = (workdir / "logs" / "worker-3.log").read_text()
    assert log.count("trainer argv:") == 2 and "SWD_DISTRIBUTED=1" in log  # appended, one header per run
    assert "the trainer exited 75" in log and "the trainer exited 0" in log


def test_worker_train_copies_the_log_to_a_gs_workdir(worker_home, tmp_path):
    proc = run_worker(worker_home, tmp_path, "gs://b/run", "tiny", rc=1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls[-1] == ["storage", "cp", "-q", str(worker_home / "swd_run" / "worker-3.log"),
                         "gs://b/run/logs/worker-3.log"]


def test_worker_train_attaches_to_its_running_trainer(worker_home, tmp_path):
    """A second `train` with the same arguments (the launcher's rerun after a dropped ssh) starts no second one."""
    env = worker_env(worker_home, tmp_path, rc=75, seconds=1.5)
    args = ["bash", WORKER, "train", str(tmp_path / "r"), "tiny"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = tmp_path / "r" / "logs" / "worker-3.log"
    for _ in range(100):
        if log.exists() and "trainer argv" in log.read_text():
            break
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
    assert first.wait(timeout=30) == 75 and second.returncode == 75, second.stdout + second.stderr
    assert "attaching to the trainer that is running with these arguments" in second.stdout
    assert log.read_text().count("trainer argv") == 1
