"""The process layout of a multi-process run: connect the processes with `jax.distributed.initialize`, and stop
them all, each with one line, when one fails or dies.

Sources of the layout, first found wins:
- flags / arguments `coordinator`, `num_processes`, `process_id` (the trainer's `--coordinator=HOST:PORT
  --num_processes=N --process_id=I`, precompute's `--coordinator ...`);
- environment variables SWD_COORDINATOR (host:port of process 0), SWD_NUM_PROCESSES, SWD_PROCESS_ID
  (a local or GPU cluster; `launch/local_multiprocess.sh` sets them);
- SWD_DISTRIBUTED=1 or a Cloud TPU VM (TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE set by the runtime):
  `jax.distributed.initialize()` with no arguments, which reads the slice's layout itself.
Otherwise the run is one process. On CPU, several processes exchange data over gloo collectives.

When one process stops, the others stop within seconds, each printing `error: stopping: <which process, why>`
once (the process that failed prints its own error). Everything goes through the coordination service's
key-value store (hosted by process 0):
- `swd/failed` holds the first failure, `"<process>\\t<reason>"`; later ones keep it (first writer wins).
- A watchdog thread per process (`initialize` starts it) bumps `swd/alive/<i>` every 0.5 s and reads
  `swd/failed`; on a failure it stops its process (`stop`). Process 0's watchdog also declares a process that has
  not bumped its counter for SWD_PEER_TIMEOUT_S (default 15 s) failed: it was killed, or its host is gone.
  jax's own heartbeat (which aborts with a C++ stack) is set 4x longer, so ours always speaks first. A live
  process whose Python is blocked that long (a C call holding the GIL) would be taken for dead: raise the value.
- A stopping process records `swd/left/<i>` and exits at once with `os._exit` (jax's shutdown barrier would
  hold it, and the others, for minutes). Process 0 first waits a few seconds for the others' `swd/left`: it
  hosts the service, and a process that loses the service aborts in C++ (`swd_jax.train.supervisor` turns that
  abort, and the one that follows process 0's death, into one line). A normal exit records `swd/left/<i>` too,
  so a process that finished early is never taken for dead.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

ENV = ("SWD_COORDINATOR", "SWD_NUM_PROCESSES", "SWD_PROCESS_ID")
FAILED = "swd/failed"  # the first failure: "<process>\t<reason>"
ALIVE = "swd/alive/"  # + process: a counter its watchdog bumps
LEFT = "swd/left/"  # + process: it stopped (after a failure) or exited normally
POLL_S = 0.5
ACK_WAIT_S = 5.0  # process 0, stopping: how long it waits for the others to leave first


def _on_tpu_vm() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def peer_timeout_s() -> float:
    """SWD_PEER_TIMEOUT_S (default 15): how long a silent process is waited for before it is declared dead."""
    value = os.environ.get("SWD_PEER_TIMEOUT_S", "15")
    try:
        return max(float(value), 2 * POLL_S)
    except ValueError:
        raise ValueError(f"SWD_PEER_TIMEOUT_S={value!r} is not a number of seconds") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> int:
    """Connect this process to the others if the layout says there are several; returns the process count."""
    coordinator = coordinator or os.environ.get("SWD_COORDINATOR") or None
    if num_processes is None and os.environ.get("SWD_NUM_PROCESSES"):
        num_processes = _int_env("SWD_NUM_PROCESSES")
    if process_id is None and os.environ.get("SWD_PROCESS_ID"):
        process_id = _int_env("SWD_PROCESS_ID")
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        missing = [name for name, ok in zip(ENV, given) if not ok]
        raise ValueError(f"a multi-process run needs the coordinator, the process count and this process's id; "
                         f"missing {missing} (set the variables or the flags)")
    heartbeat_s = max(100, int(4 * peer_timeout_s()))  # jax's heartbeat aborts in C++: ours must act first
    if all(given):
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise ValueError(f"process id {process_id} not in [0, {num_processes})")
        if num_processes > 1:  # CPU devices (tests, a local run) need gloo; accelerators ignore it
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_s)
    elif os.environ.get("SWD_DISTRIBUTED") == "1" or _on_tpu_vm():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_s)
    if _state().client is not None and (_state().num_processes or 1) > 1:
        _Watchdog.start()  # before the backends start (that can take a while): it keeps this process alive
    return jax.process_count()


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not an integer") from None


_barriers = [0]


def barrier(what: str, timeout_s: int = 3600, poll_s: float = 0.2) -> None:
    """Wait until every process gets here (coordination service; no device collective, so no 30 s gloo timeout).

    Used after compiling: processes finish compiling minutes apart under load, and the first collective of a
    program gives up after 30 s (gloo's context set-up) when the others are still compiling. A process that
    fails meanwhile stops this one at once, naming it (`stop`), instead of after `timeout_s`.
    """
    if jax.process_count() == 1:
        return
    client = _client()
    _barriers[0] += 1
    key = f"swd/barrier/{_barriers[0]}/{what}"
    client.key_value_increment(key, 1)
    deadline = time.monotonic() + timeout_s
    while True:
        failure = another_failure()
        if failure is not None:
            stop(failure)
        if int(_get(client, key) or 0) >= jax.process_count():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {what!r}: not every process arrived within {timeout_s} s")
        time.sleep(poll_s)


_exit_lock = threading.Lock()  # held by the one thread that ends this process (the watchdog or the main thread)


def abandon(reason: str, rc: int) -> None:
    """This process failed (its error is printed): record why for the others, then exit without jax's shutdown
    barrier (the others never reach it; it would hold this process, and them, for minutes)."""
    _exit_lock.acquire()
    me = _state().process_id
    _record_failure(me, f"process {me} failed: {reason}")
    _leave(rc)


def stop(reason: str, rc: int = 1) -> None:
    """Another process failed: print `error: stopping: <reason>` once and exit (never returns)."""
    _exit_lock.acquire()  # a second caller waits here until the first one's os._exit
    print(f"error: stopping: {reason}", file=sys.stderr, flush=True)
    _leave(rc)


def another_failure(wait_s: float = 0.0) -> str | None:
    """The failure another process recorded (its reason), waiting up to `wait_s` for one; None if none."""
    deadline = time.monotonic() + wait_s
    while True:
        failed = _get(_client(), FAILED)
        if failed is not None:
            who, _, reason = failed.partition("\t")
            if who != str(_state().process_id) or reason.endswith(_SILENT):  # a silent one may still be running
                return reason
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S / 2)


def _record_failure(process: int, reason: str) -> None:
    """Record the run's failure unless one is recorded already (the first one is the cause)."""
    try:
        _client().key_value_set(FAILED, f"{process}\t{reason}")
    except jax.errors.JaxRuntimeError:  # ALREADY_EXISTS (a failure came first), or the service is gone
        pass


def _leave(rc: int) -> None:
    """Record that this process leaves; process 0 waits for the others (it hosts the service); exit."""
    _Watchdog.halted.set()
    client, me = _client(), _state().process_id
    try:
        client.key_value_set(f"{LEFT}{me}", "stopped", allow_overwrite=True)
        if me == 0:
            deadline = time.monotonic() + ACK_WAIT_S
            failed = (_get(client, FAILED) or "").partition("\t")[0]
            waiting = {str(k) for k in range(1, _state().num_processes)} - {failed}
            while waiting and time.monotonic() < deadline:
                waiting -= {key.rsplit("/", 1)[-1] for key, _ in client.key_value_dir_get(LEFT)}
                time.sleep(POLL_S / 5)
    except jax.errors.JaxRuntimeError:
        pass  # the service is gone: nobody left to tell
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


_SILENT = "(killed, or its host is gone)"


class _Watchdog:
    """The thread that keeps this process's `swd/alive` counter moving and stops it when another one fails."""
    thread: threading.Thread | None = None
    halted = threading.Event()

    @classmethod
    def start(cls) -> None:
        if cls.thread is None:
            state = _state()
            cls.thread = threading.Thread(target=cls._run, args=(state.client, state.process_id,
                                          state.num_processes, peer_timeout_s()), name="swd-watchdog", daemon=True)
            cls.thread.start()
            atexit.register(cls._normal_exit)  # runs before jax's own atexit shutdown (registered earlier)

    @classmethod
    def _normal_exit(cls) -> None:
        cls.halted.set()
        if cls.thread is not None:
            cls.thread.join(timeout=2 * POLL_S)  # no request of its own once jax's shutdown begins
        try:
            _client().key_value_set(f"{LEFT}{_state().process_id}", "done", allow_overwrite=True)
        except (jax.errors.JaxRuntimeError, AttributeError):
            pass

    @classmethod
    def _run(cls, client, me: int, n: int, timeout_s: float) -> None:
        seen: dict[str, tuple[str | None, float]] = {}  # process -> (its counter, since when)
        errors = 0
        while not cls.halted.wait(POLL_S):
            try:
                client.key_value_increment(f"{ALIVE}{me}", 1)
                failure = another_failure()
                if me == 0 and failure is None:
                    failure = cls._silent_peer(client, n, timeout_s, seen)
                errors = 0
            except jax.errors.JaxRuntimeError as e:  # the service is gone: process 0 died
                errors += 1
                if me == 0 or errors < 2:
                    continue
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                failure = f"process 0 (the coordinator, {_address()}) is gone: {first}"
            if failure is not None and not cls.halted.is_set():
                stop(failure)

    @staticmethod
    def _silent_peer(client, n: int, timeout_s: float, seen: dict) -> str | None:
        """Process 0: the first process whose counter has not moved for `timeout_s` is recorded failed."""
        now = time.monotonic()
        alive = {key.rsplit("/", 1)[-1]: value for key, value in client.key_value_dir_get(ALIVE)}
        left = {key.rsplit("/", 1)[-1] for key, _ in client.key_value_dir_get(LEFT)}
        for k in map(str, range(1, n)):
            value, since = seen.get(k, (None, now))
            if k in left or alive.get(k) != value:
                seen[k] = (alive.get(k), now)
            elif now - since > timeout_s:
                _record_failure(int(k), f"process {k} stopped responding for {timeout_s:g} s {_SILENT}")
                return another_failure()
            else:
                seen[k] = (value, since)
        return None


def _address() -> str:
    return _state().coordinator_address or "?"


def _state():
    """jax's record of the connection: client, process_id, num_processes (known before the backends start)."""
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state


def _client():
    return _state().client


def connected() -> bool:
    """Whether this process is one of several connected by `initialize`."""
    return _client() is not None and jax.process_count() > 1


def _get(client, key: str) -> str | None:
    """The key-value store's value at `key`, or None where it has none (try_get raises NOT_FOUND)."""
    try:
        return client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError:
        return None
