"""What every swd command line shares: quiet logs, the persistent compile cache, one-line errors for user errors.

- Logs: third-party INFO (absl, orbax, jax, grain) is off unless `--verbose`; warnings stay visible.
- Compile cache: compiled XLA programs are kept in `$SWD_COMPILE_CACHE` (default `~/.cache/swd_jax/xla`, or
  `$XDG_CACHE_HOME/swd_jax/xla`; `SWD_COMPILE_CACHE=off` disables it), so a rerun or a resume skips compiling.
- Errors: a user error (bad config field, missing file, wrong checkpoint, ...) prints `error: <one line>` and
  exits 2; `--debug` shows the traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, KeyError)


def quiet_logs(verbose: bool = False) -> None:
    """Third-party INFO logs off (unless verbose); WARNING and above stay visible."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax", "grain", "etils", "tensorflow", "tensorflow_datasets", "root"):
        logging.getLogger(name).setLevel(level)
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
    except USER_ERRORS as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
