"""The console process of a multi-process run: runs the command as its child and keeps jax's native crash
output off the console.

Some ends of a multi-process run come from jax's C++ runtime, not from Python: when process 0 (which hosts the
coordination service) dies, every other process's coordination agent aborts at once with an
`F... Terminating process because the JAX distributed service detected fatal errors` line and a C++ stack
(SIGABRT), and nothing in-process can act first. So in a multi-process run the console process starts the real
command as its child (same arguments, SWD_SUPERVISED=1 in its environment) and:
- passes the child's stdout through untouched, and its stderr line by line, except native lines (glog-format
  `E0102 12:34:56.789 ...`, `*** Check failure stack trace: ***`, `    @ 0x...`, `terminate called ...`, and
  everything after a fatal one), which go to `$SWD_NATIVE_LOG_DIR/swd_native_process<i>.log` (default
  folder: the system's temp folder);
- forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 unchanged (SIGTERM reaches jax's C++ preemption
  notifier in the child), except a Ctrl-C that the terminal already sent to the child too;
- has the child killed (SIGKILL) when it is itself killed (Linux's parent-death signal), so a kill still kills;
- exits with the child's exit code, except when the child died of a signal without printing an `error:` line:
  then it prints one (`error: stopping: process 0 (the coordinator, HOST:PORT) is gone: <status>; native log:
  PATH` after a fatal error) and exits 1 after a fatal error, else 128 + the signal.
Single-process runs are not supervised (nothing native ends them that way), nor is anything off Linux.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile

MARKER = "SWD_SUPERVISED"
NATIVE = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d\d|\*\*\* Check failure|\s+@\s+0x|terminate called")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


def wanted(num_processes: int | None = None) -> bool:
    """Whether this console process supervises: a multi-process layout (flag, SWD_NUM_PROCESSES,
    SWD_DISTRIBUTED=1, a multi-host TPU VM), on Linux, and not already the supervised child."""
    if os.environ.get(MARKER) == "1" or not sys.platform.startswith("linux"):
        return False
    if num_processes is None and os.environ.get("SWD_NUM_PROCESSES"):
        try:
            num_processes = int(os.environ["SWD_NUM_PROCESSES"])
        except ValueError:
            return False  # the trainer itself reports the bad value
    if num_processes is not None:
        return num_processes > 1
    return os.environ.get("SWD_DISTRIBUTED") == "1" or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def supervise(cmd: list[str], process_id: int | None = None, coordinator: str | None = None) -> int:
    """Run `cmd` as the supervised child (see the module doc); returns the exit code for this process."""
    if process_id is None:
        process_id = os.environ.get("SWD_PROCESS_ID") or os.environ.get("TPU_WORKER_ID") or os.getpid()
    coordinator = coordinator or os.environ.get("SWD_COORDINATOR") or "its address"
    log_dir = os.environ.get("SWD_NATIVE_LOG_DIR") or tempfile.gettempdir()
    console = _Console(os.path.join(log_dir, f"swd_native_process{process_id}.log"))
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: preexec_fn only calls it
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, MARKER: "1"},
                             preexec_fn=die_with_parent)
    forwarded: set[int] = set()

    def forward(signum, frame) -> None:
        forwarded.add(signum)
        if signum == signal.SIGINT and _terminal_sent_it_too():
            return
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while chunk := os.read(child.stderr.fileno(), 1 << 16):
        console.write(chunk)
    rc = child.wait()
    console.close()
    if rc >= 0 or console.said_error:
        return rc if rc >= 0 else 1
    sig = signal.Signals(-rc)
    log = f"; native log: {console.log_path}" if console.logged else ""
    if console.fatal is not None:
        print(f"error: stopping: {_fatal_reason(console.fatal, str(process_id), coordinator)}{log}",
              file=sys.stderr, flush=True)
        return 1
    if sig not in forwarded:
        print(f"error: process {process_id} died of {sig.name}{log}", file=sys.stderr, flush=True)
    return 128 + sig


class _Console:
    """Sorts the child's stderr, line by line (a `\\r` ends a line too, so progress bars stay live): the
    console, or the native log (opened at its first line)."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.log = None
        self.logged = False
        self.fatal: str | None = None  # the first fatal line: the cause
        self.said_error = False  # the child printed its own `error:` line
        self.head = b""  # the current line's start, until it is sorted
        self.sink = None  # where the rest of the current line goes, once sorted

    def write(self, data: bytes) -> None:
        for piece in re.split(rb"(?<=[\r\n])", data):
            if self.sink is None:
                self.head += piece
                if not (self.head.endswith((b"\n", b"\r")) or len(self.head) >= 32
                        or len(self.head) >= 6 and self.head[:1] not in b"IWEF* t"):
                    continue  # too short to tell yet
                piece, self.sink = self.head, self._sort(self.head)
            self.sink(piece)
            if piece.endswith((b"\n", b"\r")):
                self.head, self.sink = b"", None

    def _sort(self, head: bytes):
        native = NATIVE.match(head)
        if native is None and self.fatal is None:
            self.said_error = self.said_error or head.startswith(b"error:")
            return self._to_console
        if self.fatal is None and (head.startswith(b"terminate called") or native.group(1) == b"F"):
            self.fatal = ""  # filled by _to_log, up to the line's end
        return self._to_log

    @staticmethod
    def _to_console(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    def _to_log(self, data: bytes) -> None:
        if self.log is None:
            try:
                self.log = open(self.log_path, "ab")
            except OSError:
                self.log = open(os.devnull, "wb")
        self.log.write(data)
        self.log.flush()
        self.logged = True
        if self.fatal is not None and len(self.fatal) < 2000 and not self.fatal.endswith("\n"):
            self.fatal += data.decode(errors="replace")  # the rest of the fatal line, for its reason

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _terminal_sent_it_too() -> bool:
    """Whether this process is in its terminal's foreground group: a Ctrl-C there reached the child as well."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _fatal_reason(line: str, process_id: str, coordinator: str) -> str:
    """One line from a glog fatal line: which process is gone (when the service is), and the status."""
    text = line.split("] ", 1)[-1].strip()
    status = text.split("absl::Status:", 1)[-1].strip() if "absl::Status:" in text else text
    status = status.split(". ")[0].rstrip(".")[:200]
    if process_id != "0" and "coordination service" in text.lower() and (
            "UNAVAILABLE" in text or "Socket closed" in text or "leader" in text):
        return f"process 0 (the coordinator, {coordinator}) is gone: {status}"
    return f"jax's distributed runtime ended process {process_id}: {status}"
