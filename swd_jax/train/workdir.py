"""A run's workdir, local or `gs://`: the lease that makes it one run's, its metrics, and its recorded config.

On a TPU slice the hosts share nothing but Cloud Storage, so everything a run keeps goes through
`swd_jax.storage`, and only process 0 writes the run's own files (every process may read them).

- `WorkdirLease`: one run per workdir. Locally an exclusive `flock` on `<workdir>/.lock` (released by the OS
  when the process dies). On `gs://`, an object `<workdir>/.lock` created with the generation precondition
  "does not exist" and naming host, pid and start time; the holder rewrites it every `renew_s` (precondition:
  its own generation), so a run killed outright leaves a lease that goes stale. A second run is refused naming
  the holder; a lease not renewed for `stale_s` is taken over with a line saying so. A holder that finds its
  lease taken (`check`) stops: two runs never write one workdir.
- `MetricsWriter`: TensorBoard events and `metrics.jsonl`. They are written into a `storage.Staged` folder (the
  workdir itself when local) and uploaded by `sync()` (at most every `sync_every_s`, and at each checkpoint and
  at the end); samples and the exported adapter go to the same staged folder.
- `check_resume_config` / `record_config`: config.json, config_history.jsonl.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time

import jax

from swd_jax import storage
from swd_jax.train.config_checks import resume_changes


class WorkdirInUse(FileExistsError):
    """Another run holds the workdir."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(owner: dict | str) -> str:
    if isinstance(owner, str):
        return owner or "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')})"


class WorkdirLease:
    """Held by process 0 for the whole run; see the module docstring. Other processes hold nothing."""

    def __init__(self, workdir: str, *, stale_s: float | None = None, renew_s: float | None = None):
        self.workdir = storage.resolve(workdir)
        self.stale_s = float(stale_s or os.environ.get("SWD_LEASE_STALE_S", 120))
        self.renew_s = float(renew_s or os.environ.get("SWD_LEASE_RENEW_S", min(30.0, self.stale_s / 4)))
        self.lost: str | None = None
        self._file, self._blob, self._generation, self._thread = None, None, None, None
        self._stop = threading.Event()
        if jax.process_index() != 0:
            return
        if storage.is_remote(self.workdir):
            self._acquire_gcs()
        else:
            self._acquire_local()

    # -- local: flock --------------------------------------------------------------------------------------
    def _acquire_local(self):
        path = os.path.join(self.workdir, ".lock")
        try:
            self._file = open(path, "a+")
        except OSError as e:  # read-only file system, no permission: one line, not a traceback
            raise PermissionError(f"cannot write {path}: {e.strerror}; the workdir must be writable") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            owner = self._file.read().strip()
            self._file.close()
            self._file = None
            raise WorkdirInUse(f"{self.workdir} is in use by {_describe(owner)}; stop that run or use another "
                               "--workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(_describe(_owner()))
        self._file.flush()

    # -- gs://: an object with generation preconditions ------------------------------------------------------
    def _acquire_gcs(self):
        from google.api_core.exceptions import NotFound, PreconditionFailed
        from google.cloud import storage as gcs
        bucket, key = self.workdir[len(storage.GCS):].split("/", 1) if "/" in self.workdir[5:] else (
            self.workdir[5:], "")
        client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
        self._blob = client.bucket(bucket).blob(f"{key}/.lock" if key else ".lock")
        self._owner = _owner()
        for _ in range(5):
            try:
                self._blob.upload_from_string(json.dumps(self._owner), if_generation_match=0)
                break
            except PreconditionFailed:
                pass
            try:
                self._blob.reload()
                holder = json.loads(self._blob.download_as_text(if_generation_match=self._blob.generation))
            except NotFound:  # released meanwhile: try again
                continue
            except (PreconditionFailed, ValueError):
                holder = {}
            age = time.time() - self._blob.updated.timestamp()
            if age < self.stale_s:
                raise WorkdirInUse(
                    f"{self.workdir} is in use by {_describe(holder)}: its lease was renewed {age:.0f} s ago (a "
                    f"lease not renewed for {self.stale_s:.0f} s is taken over); stop that run or use another "
                    "--workdir")
            try:
                self._blob.upload_from_string(json.dumps(self._owner), if_generation_match=self._blob.generation)
            except PreconditionFailed:
                continue
            print(f"taking over {self.workdir}/.lock from {_describe(holder)}: not renewed for {age:.0f} s "
                  "(that run is gone)", file=sys.stderr)
            break
        else:
            raise WorkdirInUse(f"{self.workdir}: could not take its lease (other runs are taking it)")
        self._generation = self._blob.generation
        self._thread = threading.Thread(target=self._renew, name="swd-workdir-lease", daemon=True)
        self._thread.start()

    def _renew(self):
        from google.api_core.exceptions import GoogleAPIError, PreconditionFailed
        while not self._stop.wait(self.renew_s):
            try:
                self._blob.upload_from_string(json.dumps(self._owner), if_generation_match=self._generation)
                self._generation = self._blob.generation
            except PreconditionFailed:
                self.lost = f"{self.workdir}/.lock was taken over by another run"
                return
            except GoogleAPIError as e:  # transient: the next renewal tries again
                print(f"warning: could not renew {self.workdir}/.lock: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raise WorkdirInUse when the lease was lost (another run took over the workdir)."""
        if self.lost:
            raise WorkdirInUse(f"{self.lost}; stopped so that two runs never write one workdir")

    def release(self):
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._blob is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=10)
            if not self.lost:
                from google.api_core.exceptions import GoogleAPIError
                try:
                    self._blob.delete(if_generation_match=self._generation)
                except GoogleAPIError:
                    pass
            self._blob = None


WorkdirLock = WorkdirLease  # the name before leases worked on gs://


class MetricsWriter:
    """Every metric to TensorBoard (tensorboardX) and to `metrics.jsonl` (one row per step), from process 0 only.

    Opening it for a run resumed at `start` drops the rows of later steps (written before a kill, replayed now);
    a `metrics.jsonl` deleted during the run is recreated with a warning. Files live in `self.staged.path`
    (the workdir when local); `sync()` uploads them to a gs:// workdir.
    """

    def __init__(self, workdir: str, start: int = 0, sync_every_s: float = 30.0):
        self.active = jax.process_index() == 0
        self.sync_every_s, self._synced = sync_every_s, time.monotonic()
        if self.active:
            from tensorboardX import SummaryWriter
            self.staged = storage.Staged(workdir)
            self.staged.fetch("metrics.jsonl")
            self.tb = SummaryWriter(os.path.join(self.staged.path, "tb"), purge_step=start + 1 if start else None)
            self.path = os.path.join(self.staged.path, "metrics.jsonl")
            self._keep_rows_up_to(start)
            self.jsonl = open(self.path, "a")

    @property
    def folder(self) -> str | None:
        """The local folder standing for the workdir (samples, the exported adapter go here too)."""
        return self.staged.path if self.active else None

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
        if time.monotonic() - self._synced > self.sync_every_s:
            self.sync()

    def image(self, tag: str, grid_HW3, step: int):
        """A uint8 [H, W, 3] image to TensorBoard (validation grids)."""
        if self.active:
            self.tb.add_image(tag, grid_HW3, step, dataformats="HWC")
            self.tb.flush()

    def sync(self):
        """Flush, and upload what changed to a gs:// workdir."""
        if self.active:
            self.tb.flush()
            self.jsonl.flush()
            self.staged.sync()
            self._synced = time.monotonic()

    def close(self):
        if self.active:
            self.tb.close()
            self.jsonl.close()
            self.staged.close()


def check_resume_config(c, workdir: str, allow: bool) -> list[str]:
    """Refuse a resume whose config changes what the run trains (unless allowed); the harmless changes."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return []
    try:
        recorded = json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable recorded config ({e}); move it away to start a new run there") from None
    refused, allowed = resume_changes(recorded, c)
    if refused and not allow:
        raise ValueError(f"{workdir} holds a run with another config; these changes alter what it trains: "
                         f"{'; '.join(refused)}. Use a new --workdir, or pass --allow-config-change to resume anyway")
    return refused + allowed


def record_config(c, workdir: str, start: int, changes: list[str]) -> None:
    """config.json = the config in force; config_history.jsonl keeps every change made on a resume."""
    if changes:
        history = storage.join(workdir, "config_history.jsonl")
        old = storage.read_text(history) if storage.exists(history) else ""
        storage.write_text(history, old + json.dumps({"resumed_at_step": start, "changes": changes}) + "\n")
        print(f"resuming with config changes: {'; '.join(changes)}", file=sys.stderr)
    storage.write_text(storage.join(workdir, "config.json"), c.to_json_best_effort(indent=2))
