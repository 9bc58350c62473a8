"""Preemption: a SIGTERM (a spot or queued TPU slice's notice, ~30 s of grace) or SIGINT ends the run at one
step every process agrees on, with that step checkpointed, one line, and exit code 75 (`PREEMPTED_EXIT`).

- Several processes: jax's preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM in
  C++ on whichever process gets it, tells the others through the coordination service, and
  `multihost_utils.reached_preemption_sync_point(step)` becomes true on every process at the same step
  (the largest step any process had reached, plus one). Every process calls it at every step. SIGINT (Ctrl-C
  on one process) is turned into a SIGTERM to itself, so it takes the same path.
- One process: a Python handler for SIGTERM and SIGINT sets a flag; the loop stops at its next step.

The loop then reads the pending metrics, saves the step (unless just saved), waits for the save to be on
disk (or on gs://), and raises `Preempted`; the command line prints its message and exits 75. A rerun of the
same command resumes from that checkpoint exactly (CPU: bitwise).
"""
from __future__ import annotations

import signal
import sys
import time

import jax

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: try again (launch/tpu_pod.sh relaunches on it)


class Preempted(Exception):
    """The run stopped on a preemption notice, with `step` checkpointed."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class PreemptionWatch:
    """Install with `with PreemptionWatch() as watch:`; `watch.reached(step)` at every step of the loop."""

    def __init__(self):
        from swd_jax.train import distributed
        self.several = jax.process_count() > 1 and distributed.connected()
        self.signal_name: str | None = None
        self.signal_time: float | None = None
        self._previous = {}

    def __enter__(self) -> PreemptionWatch:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        if self.several:
            self._install(signal.SIGINT, self._forward_as_sigterm)
        else:
            self._install(signal.SIGTERM, self._note)
            self._install(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _install(self, sig, handler) -> None:
        self._previous[sig] = signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_name, self.signal_time = signal.Signals(signum).name, time.monotonic()
        print(f"{self.signal_name} received: stopping at the next step and saving it", file=sys.stderr, flush=True)

    def _forward_as_sigterm(self, signum, frame) -> None:
        import os
        self.signal_name, self.signal_time = "SIGINT", time.monotonic()
        print("SIGINT received: stopping every process at an agreed step and saving it", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption notifier, which tells the other processes

    def reached(self, step: int) -> bool:
        """Whether the run must stop before iteration `step` (the same answer on every process)."""
        if self.several:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal_name is not None

    def seconds_since_signal(self) -> float | None:
        return None if self.signal_time is None else time.monotonic() - self.signal_time
