"""Fault rows of `swd-train` (see tests/fault_table.py): broken checkpoints, divergence, failed saves, bad input.

Every row starts from a copy of ONE finished tiny run built once per test session (`finished_run()`: 6 steps,
checkpoints 2, 4, 6), damages it, and runs `swd-train` in this process the way a user reruns it. Rows whose
recovery must not retrain put the damage in a newer step `8` (a copy of 6): the fallback lands on 6 = train.steps
and finishes at once; the rows named after the issue's probes damage step 6 itself and retrain 5-6.
Rows that need a small or read-only file system (ENOSPC, EROFS) mount one and are skipped without root.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from tests.fault_table import FaultCase, run_cli

STEPS = 6
BASE_ARGS = ["--config", "tiny", "--config.model.random.num_layers=2", "--config.model.random.dual_attention_layers=0",
             "--config.schedule.scales=8,16", "--config.schedule.boundaries=0,14,28", "--config.loss.n_fake_steps=2",
             "--config.loss.cls_blocks=0", "--config.loss.mmd_blocks=0", "--config.train.export_peft=False",
             f"--config.train.steps={STEPS}", "--config.train.ckpt_every=2", "--config.train.log_every=1",
             "--config.mesh.shape=8,1,1"]
_BASE: dict[str, pathlib.Path] = {}


def train_cli(workdir, *extra: str, base: bool = True) -> tuple[int, str]:
    """(exit code, stderr) of `swd-train BASE_ARGS --workdir workdir extra...`, in this process, sharing the
    compile cache of the tests."""
    import jax

    from swd_jax.cli.train import main
    cache = jax.config.jax_compilation_cache_dir
    old = os.environ.get("SWD_COMPILE_CACHE")
    os.environ["SWD_COMPILE_CACHE"] = cache or "off"
    try:
        return run_cli(main, (BASE_ARGS if base else []) + ["--workdir", str(workdir), *extra])
    finally:
        if old is None:
            os.environ.pop("SWD_COMPILE_CACHE", None)
        else:
            os.environ["SWD_COMPILE_CACHE"] = old


def finished_run() -> pathlib.Path:
    """The workdir of one finished 6-step run (checkpoints 2, 4, 6), built on first use in this session."""
    if "run" not in _BASE:
        root = pathlib.Path(tempfile.mkdtemp(prefix="swd_fault_base_"))
        atexit.register(shutil.rmtree, root, True)
        rc, err = train_cli(root / "run")
        assert rc == 0, err[-3000:]
        _BASE["run"] = root / "run"
    return _BASE["run"]


def copy_run(tmp_path: pathlib.Path, name: str = "run") -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(finished_run(), dst)
    return dst


def ckpt(run: pathlib.Path, step) -> pathlib.Path:
    return run / "checkpoints" / str(step)


def newer_copy(run: pathlib.Path) -> pathlib.Path:
    """checkpoints/8 = a copy of step 6 (to be damaged): the fallback lands on 6, which needs no training."""
    shutil.copytree(ckpt(run, 6), ckpt(run, 8))
    return ckpt(run, 8)


def array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(max(glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True),
                            key=os.path.getsize))


def garble(f: pathlib.Path, n: int = 16):
    """Invert n bytes at 1/8, 2/8, ... 7/8 of the file (one spot may fall in bytes no array reads)."""
    b = bytearray(f.read_bytes())
    for k in range(1, 8):
        at = len(b) * k // 8
        b[at:at + n] = bytes(x ^ 0xFF for x in b[at:at + n])
    f.write_bytes(bytes(b))


def truncate(f: pathlib.Path):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def remove(p: pathlib.Path):
    shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------------------------
# checks on what a row left on disk
# ----------------------------------------------------------------------------------------------------------------
def steps_on_disk(run: pathlib.Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def set_aside(*names: str, steps=None):
    """The named step folders were set aside with a REASON.txt (and `steps`, if given, is the folder's listing)."""
    def check(tmp_path):
        run = tmp_path / "run"
        for n in names:
            assert (run / "checkpoints" / n / "REASON.txt").read_text().strip(), n
        if steps is not None:
            assert steps_on_disk(run) == sorted(steps), steps_on_disk(run)
    return check


def untouched(tmp_path):
    """Nothing set aside, every step of the finished run still there."""
    assert steps_on_disk(tmp_path / "run") == ["2", "4", "6"], steps_on_disk(tmp_path / "run")


def metrics_steps(run: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]


# ----------------------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------------------
def damaged(step: int, damage, *extra: str):
    """A row's run: damage checkpoints/<step> (8: a copy of 6) with `damage(step_dir)`, then rerun swd-train."""
    def run(tmp_path):
        r = copy_run(tmp_path)
        damage(newer_copy(r) if step == 8 else ckpt(r, step))
        return train_cli(r, *extra)
    return run


def fallback(name: str, step: int, damage, says_reason: str = "") -> FaultCase:
    good = 6 if step == 8 else 4
    return FaultCase(name, damaged(step, damage), 0,
                     rf"WARNING: checkpoint step {step} is broken \(.*{says_reason}.*\); moved to \S*"
                     rf"checkpoints/{step}\.corrupt; resuming from step {good}",
                     set_aside(f"{step}.corrupt", steps=["2", "4", "6", f"{step}.corrupt"]))


def every_step_broken(tmp_path):
    r = copy_run(tmp_path)
    for s in (2, 4, 6):
        (ckpt(r, s) / "state" / "_METADATA").write_text("")
    return train_cli(r)


def two_newest_broken(tmp_path):
    r = copy_run(tmp_path)
    garble(array_file(newer_copy(r)))
    (ckpt(r, 6) / "extra" / "metadata").unlink()
    return train_cli(r)


def broken_again(tmp_path):
    r = copy_run(tmp_path)
    shutil.copytree(ckpt(r, 6), ckpt(r, "8.corrupt"))  # set aside by an earlier run
    truncate(array_file(newer_copy(r)))
    return train_cli(r)


def only_set_aside(tmp_path):
    r = copy_run(tmp_path)
    os.replace(ckpt(r, 2), ckpt(r, "2.nonfinite"))
    os.replace(ckpt(r, 4), ckpt(r, "4.corrupt"))
    remove(ckpt(r, 6))
    return train_cli(r)


def restart_from_scratch(tmp_path):
    r = copy_run(tmp_path)
    os.replace(ckpt(r, 6), ckpt(r, "6.nonfinite"))
    return train_cli(r, "--restart-from-scratch")


def killed_inside_save(tmp_path):
    r = copy_run(tmp_path)
    tmp = r / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpt(r, 6), tmp)
    truncate(array_file(tmp))
    return train_cli(r)


def killed_mid_iteration(tmp_path):
    r = copy_run(tmp_path)
    with open(r / "metrics.jsonl", "a") as f:  # rows 7, 8 logged after the last checkpoint, the last one cut
        f.write(json.dumps({"step": 7, "gen/loss": 1.0}) + "\n" + '{"step": 8, "gen/lo')
    return train_cli(r)


def diverged_resume(*override: str):
    def run(tmp_path):
        r = copy_run(tmp_path)
        return train_cli(r, "--config.train.steps=8", "--allow-config-change", *override)
    return run


def workdir_in_use(tmp_path):
    from swd_jax.train.workdir import WorkdirLease
    r = copy_run(tmp_path)
    lock = WorkdirLease(str(r))
    try:
        return train_cli(r)
    finally:
        lock.release()


def workdir_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    return train_cli(tmp_path / "run")


def checkpoints_is_a_file(tmp_path):
    r = copy_run(tmp_path)
    shutil.rmtree(r / "checkpoints")
    (r / "checkpoints").write_text("")
    return train_cli(r)


def garbled_config_json(tmp_path):
    r = copy_run(tmp_path)
    (r / "config.json").write_text("{oops")
    return train_cli(r)


def fresh(*args: str, base: bool = True):
    def run(tmp_path):
        return train_cli(tmp_path / "run", *args, base=base)
    return run


def resumed(*args: str):
    def run(tmp_path):
        return train_cli(copy_run(tmp_path), *args)
    return run


# --- save failures: a file system that refuses the write (root: mounts, chattr) --------------------------------
def _root_or_skip():
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root (mount / chattr) to make a full or read-only file system")


@contextlib.contextmanager
def _mounted(target: pathlib.Path, *opts: str):
    target.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", *opts, str(target)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount here: {p.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def disk_full(tmp_path):
    _root_or_skip()
    used = sum(f.stat().st_size for f in finished_run().rglob("*") if f.is_file())
    with _mounted(tmp_path / "small", "-t", "tmpfs", "-o", f"size={used + 900_000}", "tmpfs") as m:
        r = m / "run"
        shutil.copytree(finished_run(), r)
        out = train_cli(r, "--config.train.steps=8")
        (tmp_path / "listing.txt").write_text("\n".join(sorted(os.listdir(r / "checkpoints"))))
        return out


def read_only_workdir(tmp_path):
    _root_or_skip()
    r = copy_run(tmp_path)
    with _mounted(r, "--bind", str(r)):
        p = subprocess.run(["mount", "-o", "remount,ro,bind", str(r)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot remount read-only: {p.stderr.strip()}")
        return train_cli(r, "--config.train.steps=8")


def read_only_checkpoints(tmp_path):
    _root_or_skip()
    r = copy_run(tmp_path)
    with _mounted(r / "checkpoints", "--bind", str(r / "checkpoints")):
        p = subprocess.run(["mount", "-o", "remount,ro,bind", str(r / "checkpoints")], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot remount read-only: {p.stderr.strip()}")
        out = train_cli(r, "--config.train.steps=8")
        (tmp_path / "listing.txt").write_text("\n".join(steps_on_disk(r)))
        return out


def checkpoints_not_writable(tmp_path):
    r = copy_run(tmp_path)
    if os.geteuid() == 0:
        p = subprocess.run(["chattr", "+i", str(r / "checkpoints")], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"chattr: {p.stderr.strip()}")
    else:
        os.chmod(r / "checkpoints", 0o555)
    try:
        out = train_cli(r, "--config.train.steps=8")
        (tmp_path / "listing.txt").write_text("\n".join(steps_on_disk(r)))
        return out
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(r / "checkpoints")])
        else:
            os.chmod(r / "checkpoints", 0o755)


def six_metric_rows(tmp_path):
    assert metrics_steps(tmp_path / "run") == list(range(1, STEPS + 1)), metrics_steps(tmp_path / "run")


def no_partial_step(tmp_path):
    listing = (tmp_path / "listing.txt").read_text().split()
    assert "6" in listing and "8" not in listing, listing


def _delete(rel: str):
    return lambda d: remove(d / rel)


def _write(rel: str, text: str):
    return lambda d: (d / rel).write_text(text)


SAVE_FAILED = r"error: cannot write checkpoint step 8 to \S+: \[Errno {}\] [^;]+; the last good checkpoint is step 6"

CASES = [
    # B. a broken latest step: moved aside as <step>.corrupt, the run resumes from the one before and finishes
    fallback("ckpt6_16_bytes_flipped", 6, lambda d: garble(array_file(d))),
    fallback("ckpt6_state_METADATA_deleted", 6, _delete("state/_METADATA"), "metadata"),
    fallback("ckpt6_extra_metadata_deleted", 6, _delete("extra/metadata")),
    fallback("ckpt_array_file_truncated", 8, lambda d: truncate(array_file(d))),
    fallback("ckpt_array_file_deleted", 8, lambda d: array_file(d).unlink()),
    fallback("ckpt_array_file_emptied", 8, lambda d: array_file(d).write_bytes(b"")),
    fallback("ckpt_state_METADATA_not_json", 8, _write("state/_METADATA", "{not json")),
    fallback("ckpt_state_METADATA_empty", 8, _write("state/_METADATA", "")),
    fallback("ckpt_extra_metadata_not_json", 8, _write("extra/metadata", "{not json")),
    fallback("ckpt_manifest_deleted", 8, _delete("state/manifest.ocdbt")),
    fallback("ckpt_array_folder_deleted", 8, _delete("state/d")),
    fallback("ckpt_state_folder_deleted", 8, _delete("state")),
    fallback("ckpt_extra_folder_deleted", 8, _delete("extra")),
    fallback("ckpt_step_folder_empty", 8, lambda d: [remove(p) for p in list(d.iterdir())]),
    FaultCase("ckpt_two_newest_broken", two_newest_broken, 0,
              r"step 8 is broken .*moved to \S*8\.corrupt; resuming from step 4(?s:.*)step 6 is broken .*"
              r"moved to \S*6\.corrupt",
              set_aside("8.corrupt", "6.corrupt", steps=["2", "4", "6", "6.corrupt", "8.corrupt"])),
    FaultCase("ckpt_broken_again_keeps_the_first", broken_again, 0, r"moved to \S*8\.corrupt\.2; resuming from step 6",
              set_aside("8.corrupt.2")),
    FaultCase("ckpt_every_step_broken", every_step_broken, 2,
              r"error: every checkpoint in \S+ is broken \(steps \[6, 4, 2\]\); step 6: .*restart-from-scratch",
              untouched),
    FaultCase("ckpt_only_steps_set_aside", only_set_aside, 2,
              r"error: \S+checkpoints holds no usable step, only steps set aside: 2\.nonfinite, 4\.corrupt .*"
              r"--restart-from-scratch"),
    FaultCase("restart_from_scratch_keeps_every_step", restart_from_scratch, 0,
              r"--restart-from-scratch: steps \[2, 4\] set aside as <step>\.restarted",
              set_aside("2.restarted", "4.restarted",
                        steps=["2", "2.restarted", "4", "4.restarted", "6", "6.nonfinite"])),
    # kills (the subprocess versions are in test_crash.py): what a kill leaves behind
    FaultCase("killed_inside_a_save", killed_inside_save, 0, r"resumed from step 6",
              set_aside(steps=["2", "4", "6"])),
    FaultCase("killed_mid_iteration_metrics_rows", killed_mid_iteration, 0, r"line 8: not JSON \(cut by a kill\?\)",
              six_metric_rows),
    # C. divergence after a resume blames the change, never the checkpoint
    FaultCase("resume_with_lr_1e30_keeps_the_checkpoint", diverged_resume("--config.optim.lr=1e30",
                                                                          "--config.optim.lr_fake=1e30"), 2,
              r"error: non-finite loss at step 7: .* the first iteration after resuming from step 6, which is kept .*"
              r"likely cause: optim.lr changed from 0.001 to 1e\+30; optim.lr_fake changed from 0.001 to 1e\+30 on "
              r"this resume", untouched),
    FaultCase("lr_inf", fresh("--config.optim.lr=inf"), 2, r"error: optim.lr=inf: must be finite and positive"),
    FaultCase("lr_zero", fresh("--config.optim.lr=0"), 2, r"error: optim.lr=0(\.0)?: must be finite and positive"),
    FaultCase("lr_negative", fresh("--config.optim.lr=-1e-3"), 2,
              r"error: optim.lr=-0.001: must be finite and positive"),
    FaultCase("lr_fake_nan", fresh("--config.optim.lr_fake=nan"), 2, r"error: optim.lr_fake=nan: must be finite"),
    # D. a save that cannot be written stops the run at once, in one line
    FaultCase("disk_full", disk_full, 2, SAVE_FAILED.format(28), no_partial_step),
    FaultCase("checkpoints_not_writable", checkpoints_not_writable, 2, SAVE_FAILED.format(r"(1|13)"),
              no_partial_step),
    FaultCase("checkpoints_read_only", read_only_checkpoints, 2, SAVE_FAILED.format(30), no_partial_step),
    FaultCase("workdir_read_only", read_only_workdir, 2, r"error: .*(Read-only file system|read-only)"),
    # E. messages
    FaultCase("lora_target_unknown", fresh("--config.lora.targets=nonexistent_module"), 2,
              r"error: lora.targets=\('nonexistent_module',\): \['nonexistent_module'\] name no Linear layer .*"
              r"valid targets .*to_q, to_k"),
    FaultCase("workdir_is_a_file", workdir_is_a_file, 2, r"error: \S+run is a file, not a folder"),
    FaultCase("checkpoints_is_a_file", checkpoints_is_a_file, 2, r"error: \S+checkpoints is a file, not a folder"),
    FaultCase("workdir_in_use", workdir_in_use, 2, r"error: \S+ is in use by pid \d+"),
    FaultCase("unknown_config_field", fresh("--config.optim.learning_rate=1"), 2, r"error: .*learning_rate"),
    FaultCase("bad_override_value", fresh("--config.train.steps=many"), 2, r"error: .*train.steps.*many"),
    FaultCase("steps_zero", fresh("--config.train.steps=0"), 2, r"error: train.steps=0: must be at least 1"),
    FaultCase("batch_size_zero", fresh("--config.train.batch_size=0"), 2, r"error: train.batch_size=0"),
    FaultCase("unknown_config_name", fresh("--config", "nosuch", base=False), 2, r"error: no config named 'nosuch'"),
    FaultCase("no_workdir_given", lambda tmp: run_cli(importlib.import_module("swd_jax.cli.train").main,
                                                      ["--config", "tiny"]), 2,
              r"error: --config and --workdir are required"),
    FaultCase("config_change_refused", resumed("--config.lora.rank=8"), 2,
              r"error: \S+ holds a run with another config; .*lora.rank: 4 -> 8.*--allow-config-change", untouched),
    FaultCase("config_change_allowed_shape_mismatch", resumed("--config.lora.rank=8", "--allow-config-change"), 2,
              r"error: .*(shape|differ)", untouched),
    FaultCase("recorded_config_garbled", garbled_config_json, 2, r"error: \S+config.json: unreadable recorded config"),
    FaultCase("steps_lowered_below_the_checkpoint", resumed("--config.train.steps=4", "--allow-config-change"), 2,
              r"error: \S+ holds step 6, beyond train.steps=4", untouched),
]
