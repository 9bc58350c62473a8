"""The process layout of a multi-process run: connect the processes with `jax.distributed.initialize`.

Sources, first found wins:
- flags / arguments `coordinator`, `num_processes`, `process_id` (the trainer's `--coordinator=HOST:PORT
  --num_processes=N --process_id=I`, precompute's `--coordinator ...`);
- environment variables SWD_COORDINATOR (host:port of process 0), SWD_NUM_PROCESSES, SWD_PROCESS_ID
  (a local or GPU cluster; `launch/local_multiprocess.sh` sets them);
- SWD_DISTRIBUTED=1 or a Cloud TPU VM (TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE set by the runtime):
  `jax.distributed.initialize()` with no arguments, which reads the slice's layout itself.
Otherwise the run is one process. On CPU, several processes exchange data over gloo collectives.
"""
from __future__ import annotations

import os
import sys
import time

import jax

from swd_jax.command_line import PeerFailed

ENV = ("SWD_COORDINATOR", "SWD_NUM_PROCESSES", "SWD_PROCESS_ID")


def _on_tpu_vm() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"))


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
    if all(given):
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise ValueError(f"process id {process_id} not in [0, {num_processes})")
        if num_processes > 1:  # CPU devices (tests, a local run) need gloo; accelerators ignore it
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif os.environ.get("SWD_DISTRIBUTED") == "1" or _on_tpu_vm():
        jax.distributed.initialize()
    return jax.process_count()


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not an integer") from None


_barriers = [0]
FAILED = "swd/failed"  # key of the coordination service's key-value store: which process stopped, and why


def barrier(what: str, timeout_s: int = 3600, poll_s: float = 0.2) -> None:
    """Wait until every process gets here (coordination service; no device collective, so no 30 s gloo timeout).

    Used after compiling: processes finish compiling minutes apart under load, and the first collective of a
    program gives up after 30 s (gloo's context set-up) when the others are still compiling. A process that
    failed meanwhile (`abandon`) ends the wait at once with its reason, instead of after `timeout_s`.
    """
    if jax.process_count() == 1:
        return
    client = _client()
    _barriers[0] += 1
    key = f"swd/barrier/{_barriers[0]}/{what}"
    client.key_value_increment(key, 1)
    deadline = time.monotonic() + timeout_s
    while True:
        failed = _get(client, FAILED)
        if failed is not None:
            time.sleep(1.0)  # let that process exit with its own code before this one (process 0 hosts the service)
            raise PeerFailed(f"stopping: {failed}")
        if int(_get(client, key) or 0) >= jax.process_count():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {what!r}: not every process arrived within {timeout_s} s")
        time.sleep(poll_s)


def abandon(reason: str, rc: int) -> None:
    """This process of a multi-process run stops: record why for the others, then exit without jax's shutdown
    barrier (the others never reach it; it would hold this process, and them, for minutes)."""
    try:
        _client().key_value_set(FAILED, f"process {jax.process_index()} failed: {reason}")
    except jax.errors.JaxRuntimeError as e:  # the service is gone (process 0 died): the others learn it there
        print(f"could not tell the other processes: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _client():
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def connected() -> bool:
    """Whether this process is one of several connected by `initialize`."""
    return _client() is not None and jax.process_count() > 1


def _get(client, key: str) -> str | None:
    """The key-value store's value at `key`, or None where it has none (try_get raises NOT_FOUND)."""
    try:
        return client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError:
        return None
