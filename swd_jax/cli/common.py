"""What every swd command line shares: quiet logs, the persistent compile cache, one-line errors for user errors.

- Logs: third-party INFO (absl, orbax, jax, grain) is off unless `--verbose`; warnings stay visible.
- Compile cache: compiled XLA programs are kept in `$SWD_COMPILE_CACHE` (default `~/.cache/swd_jax/xla`, or
  `$XDG_CACHE_HOME/swd_jax/xla`; `SWD_COMPILE_CACHE=off` disables it), so a rerun or a resume skips compiling.
- Errors: a user error (bad config field, missing file, wrong checkpoint, ...) prints `error: <one line>` and
  exits 2; `--debug` shows the traceback instead. Anything else is a bug and keeps its traceback.
- Several processes: the one that fails prints its error, tells the others and exits at once, without jax's
  shutdown barrier, which would keep every process waiting for minutes; the others stop within a second with
  `error: stopping: process I failed: ...` (`swd_jax.train.distributed`). An error here that only follows
  another process's failure (a collective whose peer is gone) is not reported: that failure is, in one line.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, KeyError)


def quiet_logs(verbose: bool = False) -> None:
    """Third-party INFO logs off (unless verbose); WARNING and above stay visible."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax", "grain", "etils", "tensorflow", "tensorflow_datasets", "root"):
        logging.getLogger(name).setLevel(level)
    for name in ("gcsfs", "google.auth"):  # "could not determine bucket type", metadata-server probes
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


def compile_cache_dir() -> str | None:
    """Where compiled programs are cached, or None when SWD_COMPILE_CACHE=off."""
    env = os.environ.get("SWD_COMPILE_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "swd_jax", "xla")


def enable_compile_cache(path: str | None = None) -> str | None:
    """Turn on jax's persistent compilation cache (programs that took over 1 s to compile); returns its folder."""
    import jax
    path = path or compile_cache_dir()
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def add_common_flags(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show third-party INFO logs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")


def run_main(fn: Callable[[], int | None], debug: bool = False) -> int:
    """Call fn(); a user error becomes `error: ...` on one line and exit code 2 (unless debug)."""
    try:
        rc = fn()
        return 0 if rc is None else int(rc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _stop_if_another_failed(e)
        if not isinstance(e, USER_ERRORS):
            _leave_others(e, 1, traceback.format_exc())
            raise
        if debug:
            _leave_others(e, 1, traceback.format_exc())
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = f"error: {' '.join(str(msg).split())}"
        print(msg, file=sys.stderr)
        return _leave_others(e, 2)


def _several_processes() -> bool:
    if "jax" not in sys.modules:  # jax never loaded: not a multi-process run
        return False
    from swd_jax.train import distributed
    return distributed.connected()


def _stop_if_another_failed(e: BaseException) -> None:
    """In a multi-process run where another process failed first: print that failure (one line) and exit.

    A runtime error (a collective whose peer is gone) often comes before that process's failure is recorded, or
    before process 0 notices a killed process: then wait for it, up to the peer timeout and 2 s."""
    if not _several_processes():
        return
    import jax

    from swd_jax.train import distributed
    wait_s = distributed.peer_timeout_s() + 2.0 if isinstance(e, jax.errors.JaxRuntimeError) else 0.0
    reason = distributed.another_failure(wait_s)
    if reason is not None:
        distributed.stop(reason)


def _leave_others(e: BaseException, rc: int, traceback_text: str = "") -> int:
    """In a multi-process run: tell the other processes why this one stops, and exit now (see the module doc);
    a traceback about to be raised is printed first (os._exit leaves the interpreter no time to). Otherwise: rc."""
    if not _several_processes():
        return rc
    from swd_jax.train import distributed
    if traceback_text:
        print(traceback_text, file=sys.stderr)
    distributed.abandon(f"{type(e).__name__}: {' '.join(str(e).split())}"[:500], rc)
    return rc  # not reached
