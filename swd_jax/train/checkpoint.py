"""Orbax checkpoints of the trainable SwD state (never the frozen base weights) and one-off parameter trees.

A training checkpoint at step N is a directory `<dir>/N/` with two items:
- "state": the train-state pytree the caller passes (student LoRA, fake-model LoRA, discriminator head, the
  two optax states, step, PRNG key data). Only what trains goes in: the teacher / base transformer is frozen,
  comes from the converted base checkpoint (`save_params` / `load_params`), and is never written here (like
  big_vision's distillation trainer, which never checkpoints the teacher).
- "extra": a JSON blob (data-loader position, config, anything small).

Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the caller may donate
or overwrite them at once) and the files are written in a background thread. Saves are atomic: on a local
or POSIX file system orbax writes `<dir>/N.orbax-checkpoint-tmp-<time>/` and renames it to `<dir>/N/` when
complete (`AtomicRenameTemporaryPath`); on GCS, where rename is not atomic, a step only counts once its
`commit_success.txt` exists (`CommitFileTemporaryPath`). Unfinished temporary directories are ignored when
listing steps; opening a `Checkpointer` removes them in the background (awaited by its first save).

Restores are strict: the stored tree must have exactly the keys, shapes and dtypes of the abstract target
(`jax.ShapeDtypeStruct`s); any difference raises a ValueError naming the keys. Arrays are read straight into
the target's shardings (a leaf with no sharding is restored replicated over all devices).
Typed PRNG keys are refused: store `jax.random.key_data(key)` and re-wrap it with `jax.random.wrap_key_data`.

Integrity: `save` refuses a state with a non-finite value (FloatingPointError naming the leaves and the last
good step; nothing is written) and stores a checksum of every array in "extra" (a position-weighted sum of
the array's bits mod 2**32, computed on device, so it does not depend on the sharding or the process count).
`restore` recomputes them and raises `CorruptCheckpoint` naming the step and the arrays that differ (also for
a step folder orbax cannot read: truncated, garbled or deleted files, an empty folder, bad metadata).

Setting aside: a step is never deleted by these rules, only renamed `<step>.<why>/` with a REASON.txt (process
0 moves, every process waits for it; on gs:// a copy then a delete):
- `.corrupt`: `restore_latest` found it broken; it resumes from the newest intact step before it, and moves the
  broken newer ones aside first (a WARNING line each: step, reason, new path), so training can save those
  steps again. Every step broken raises CorruptCheckpoint and moves nothing.
- `.nonfinite`: `quarantine`, called by the trainer when the iteration right after a checkpoint THIS run saved
  gave non-finite losses (see `loop._check_finite`). A checkpoint restored by this run is never set aside:
  it was saved finite and its checksums passed, so a non-finite loss after a resume blames the resume (a new
  learning rate, ...), not the file.
- `.restarted`: `restore_latest(..., restart=True)` (`swd-train --restart-from-scratch`) sets every step aside.
`restore_latest` never starts over silently: with no step left but some set aside it raises naming them.

Save failures (no space, permission denied, read-only file system, a bucket that refuses the write) raise
`SaveFailed`, an OSError that is also a ValueError (the command lines print it as one `error:` line), naming the
step, the path, the error and the last good step. An asynchronous save's failure surfaces at the next `save`,
`wait_until_finished` or `close`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from swd_jax import storage
from swd_jax.convert.orbax_params import check_no_prng_keys, with_shardings, check_matches

log = logging.getLogger(__name__)
CHECKSUMS = "_checksums"  # reserved key of `extra`: {leaf path: checksum}


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose files cannot be read or whose arrays do not match their saved checksums."""


class SaveFailed(OSError, ValueError):
    """A checkpoint could not be written (ENOSPC, EACCES, EROFS, ...): an OSError the command lines show as one line."""


class SetAsideOnly(ValueError):
    """The checkpoint folder holds no usable step, only steps set aside: starting over needs an explicit flag."""


RESTART_HINT = "pass --restart-from-scratch to start again from step 0 (every step is kept, renamed <step>.restarted)"
SET_ASIDE = re.compile(r"^(\d+)\.(?!orbax-checkpoint-tmp)(\w[\w.-]*)$")  # 4.nonfinite, 6.corrupt, 6.corrupt.2


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum_i bits_i * (2 i + 1) mod 2**32, all finite) of one array; i = the C-order flat index."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        u = jax.lax.bitcast_convert_type(x, bits[x.dtype.itemsize]).astype(jnp.uint32)
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    digest = jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return digest, finite


@jax.jit
def _digests(tree):
    pairs = [_leaf_digest(x) for x in jax.tree.leaves(tree)]
    return [d for d, _ in pairs], [ok for _, ok in pairs]


def state_digests(tree) -> tuple[dict[str, int], list[str]]:
    """({leaf path: checksum}, [paths of leaves holding a non-finite value]) of a pytree of arrays."""
    digests, finite = jax.device_get(_digests(tree))
    paths = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return ({p: int(d) for p, d in zip(paths, digests)}, [p for p, ok in zip(paths, finite) if not bool(ok)])


def _path_name(path) -> str:
    """'opt_fake/1/0/mu/head/...': the same for a namedtuple field and the dict key orbax may restore it as."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return "/".join(names)


def _all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (the same answer everywhere, so all take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _check_json(extra: Mapping[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint `extra` must be JSON-serializable: {e}") from e
    return dict(extra)


def _one_line(e, limit: int = 240) -> str:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    text = text.strip().splitlines()[0] if text.strip() else text
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs a failed background save's whole traceback (hundreds of lines) before raising it; we name it once."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_WRITE_ERROR = re.compile(r"OS error|PERMISSION_DENIED|RESOURCE_EXHAUSTED|Read-only|No space|Permission denied|"
                          r"Disk quota|Errno")


def _write_reason(e: BaseException) -> str:
    """'[Errno 28] No space left on device' of an OSError, or of the text tensorstore wraps it in."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {seen.strerror or os.strerror(seen.errno)}"
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text) or re.search(r"OS error (\d+)", text)
    if code:
        n = int(code.group(1))
        return f"[Errno {n}] {os.strerror(n)}"
    return _one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# the training checkpointer
# ----------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Every `save_every` steps save {state pytree, extra JSON} asynchronously to `directory`, keeping `keep`.

    What the trainer's non-finite guard needs to know is kept here: `saved_steps` (steps this Checkpointer wrote),
    `restored_step` (the step `restore_latest` resumed from) and `resume_changes` (set by the caller: the config
    changes made on this resume, named when the first iterations after it diverge).
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"need save_every >= 1 and keep >= 1, got {save_every}, {keep}")
        self.directory = storage.resolve(directory)
        self.saved_steps: set[int] = set()
        self.restored_step: int | None = None
        self.resume_changes: list[str] = []
        self._pending: int | None = None  # the step of the save running in the background
        self._failed = False
        storage.makedirs(self.directory)  # a file in its place: one line naming it
        if storage.is_remote(self.directory):  # gcsfs first reached from orbax's save thread deadlocks (fsspec's
            storage.exists(self.directory)     # loop); reaching it here, on the caller's thread, avoids that
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args_cls in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args_cls, ocp.StandardCheckpointHandler)
        for args_cls in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("extra", args_cls, ocp.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        except OSError as e:
            raise SaveFailed(f"cannot create the checkpoint folder {self.directory}: {_write_reason(e)}") from None

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (a multiple of save_every not already saved)."""
        return self._mngr.should_save(step)

    def save(self, step: int, state, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Save if `step` is due (or `force`); returns whether it saved. Returns once arrays are on host.

        Raises FloatingPointError (and writes nothing) when a leaf of `state` holds a NaN or an infinity, and
        SaveFailed when this save or the previous (asynchronous) one could not be written.
        """
        check_no_prng_keys(state, "state")
        extra = _check_json(extra or {})
        if not (force or self._mngr.should_save(step)):
            return False
        sums, bad = state_digests(state)
        if bad:
            raise FloatingPointError(
                f"step {step}: non-finite values in {bad[:6]}{' ...' if len(bad) > 6 else ''}; not saved. "
                f"{self.last_good_message()}")
        extra[CHECKSUMS] = sums
        self.wait_until_finished()  # the previous save's failure stops the run here, named
        self._probe_writable(step)
        try:
            with _quiet_orbax():
                saved = self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                      extra=ocp.args.JsonSave(extra)), force=True)
        except Exception as e:  # noqa: BLE001  a write error is the user's disk; anything else a bug
            if not (isinstance(e, OSError) or _WRITE_ERROR.search(str(e))):
                raise
            raise self._save_failed(step, e) from None
        if saved:
            self._pending = step
            self.saved_steps.add(step)
        return saved

    def _probe_writable(self, step: int) -> None:
        """A local folder that refuses a new file fails here: an orbax save that fails before its background
        threads get their start signal leaves them waiting forever, and the process would never exit."""
        if storage.is_remote(self.directory) or jax.process_index() != 0:
            return
        probe = os.path.join(self.directory, f".write_probe.{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise self._save_failed(step, e) from None

    def _save_failed(self, step: int | None, e: BaseException) -> SaveFailed:
        self._failed, self._pending = True, None
        # orbax leaves the coroutines of the abandoned save unawaited: no warning about them at exit
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        self.saved_steps.discard(step)
        good = [s for s in self._mngr.all_steps() if s != step]
        last = (f"the last good checkpoint is step {max(good)}" if good else "no checkpoint was saved before it")
        where = storage.join(self.directory, str(step)) if step is not None else self.directory
        return SaveFailed(f"cannot write checkpoint step {step} to {where}: {_write_reason(e)}; {last} "
                          f"(in {self.directory}). Free space or fix the permissions, then rerun to resume from it")

    def last_good_message(self) -> str:
        self.wait_until_finished()
        step = self.latest_step()
        if step is None:
            return f"No checkpoint in {self.directory}."
        return f"The last good checkpoint (step {step}) is kept in {self.directory}."

    def quarantine(self, step: int, reason: str) -> str | None:
        """Move step `step` aside as `<step>.nonfinite` (kept for inspection, never resumed from); its new path."""
        self.wait_until_finished()
        if step not in self.all_steps():
            return None
        return self._set_aside(step, "nonfinite", reason)

    def _set_aside(self, step: int, why: str, reason: str) -> str:
        """Rename step `step` to `<step>.<why>` (`.2`, `.3`, ... if taken) with a REASON.txt; its new path.

        Every process calls it: all pick the same name, process 0 moves, the others wait for it.
        """
        src = storage.join(self.directory, str(step))
        dst, n = storage.join(self.directory, f"{step}.{why}"), 2
        while storage.exists(dst):
            dst, n = storage.join(self.directory, f"{step}.{why}.{n}"), n + 1
        _sync(f"set aside {step} as {dst}")
        if jax.process_index() == 0:
            storage.move_tree(src, dst)
            storage.write_text(storage.join(dst, "REASON.txt"),
                               f"{reason}\n(set aside {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        _sync(f"set aside {step}")
        self._mngr.reload()
        return dst

    def set_aside_steps(self) -> list[str]:
        """Names of the steps set aside in the folder (`4.nonfinite`, `6.corrupt`, ...), by step."""
        names = [n for n in storage.listdir(self.directory) if SET_ASIDE.match(n)]
        return sorted(names, key=lambda n: (int(SET_ASIDE.match(n).group(1)), n))

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, extra) of `step`, each array placed with its abstract leaf's sharding; strict."""
        check_no_prng_keys(abstract_state, "abstract_state")
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        self.wait_until_finished()
        where = storage.join(self.directory, str(step))
        target = with_shardings(abstract_state)
        stored, error = None, "missing"
        try:
            stored = self._mngr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001  orbax raises many types for missing / garbled metadata
            error = _one_line(e)
        if not _all_processes_ok(stored is not None):
            why = error if stored is None else "on another process"
            raise CorruptCheckpoint(f"{where}: unreadable metadata ({why})")
        check_matches(stored, target, where)  # a structure mismatch is a config change: never a fallback
        out, error = None, None
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   extra=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  truncated / garbled array files, bad JSON
            error = e
        if out is not None and not isinstance(out["extra"], Mapping):
            out, error = None, "no extra/metadata"
        if not _all_processes_ok(out is not None):
            raise CorruptCheckpoint(f"{where}: cannot read it ({_one_line(error) if error else 'on another process'})")
        extra = dict(out["extra"])
        saved = extra.pop(CHECKSUMS, None)
        if saved is None:
            log.warning("%s has no checksums (written by an older swd_jax): not verified", where)
        else:
            sums, _ = state_digests(out["state"])
            wrong = sorted(k for k in set(sums) | set(saved) if sums.get(k) != saved.get(k))
            if wrong:
                raise CorruptCheckpoint(f"{where}: {len(wrong)} arrays do not match their saved checksums: "
                                        f"{wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
        return out["state"], extra

    def read(self, step: int) -> tuple[Any, dict[str, Any]]:
        """`restore` of `step` into host numpy arrays, shapes and dtypes as stored (inspection, tests)."""
        import jax.sharding as jsh
        one = jsh.SingleDeviceSharding(jax.local_devices()[0])
        meta = self._mngr.item_metadata(step)["state"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta,
                                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        state, extra = self.restore(step, abstract)
        return jax.device_get(state), extra

    def restore_latest(self, abstract_state, *, restart: bool = False) -> tuple[Any, dict[str, Any]] | None:
        """`restore` of the latest step that reads back intact, or None when the folder holds no step at all.

        Broken newer steps are moved aside as `<step>.corrupt` (a WARNING line each) before it returns, so
        training may save those steps again. Raises CorruptCheckpoint when every step is broken (nothing moved)
        and SetAsideOnly when no step is left but some were set aside: it never starts over silently.
        `restart` sets every step aside (`<step>.restarted`) and returns None: the run starts from step 0.
        """
        if restart:
            steps = self.all_steps()
            for step in steps:
                self._set_aside(step, "restarted", "set aside by --restart-from-scratch: the run started again")
            if steps:
                print(f"WARNING: --restart-from-scratch: steps {steps} set aside as <step>.restarted in "
                      f"{self.directory}; starting from step 0", file=sys.stderr, flush=True)
            return None
        broken = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                out = self.restore(step, abstract_state)
            except CorruptCheckpoint as e:
                broken.append((step, str(e)))
                continue
            for bad, why in broken:
                moved = self._set_aside(bad, "corrupt", f"{why}\nthe run resumed from step {step} instead")
                print(f"WARNING: checkpoint step {bad} is broken ({why}); moved to {moved}; resuming from step "
                      f"{step}", file=sys.stderr, flush=True)
            self.restored_step = step
            return out
        if broken:
            raise CorruptCheckpoint(f"every checkpoint in {self.directory} is broken (steps {[s for s, _ in broken]})"
                                    f"; step {broken[0][0]}: {broken[0][1]}. Nothing was moved; {RESTART_HINT}")
        aside = self.set_aside_steps()
        if aside:
            raise SetAsideOnly(f"{self.directory} holds no usable step, only steps set aside: {', '.join(aside)} "
                               f"(each has a REASON.txt); {RESTART_HINT}")
        return None

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is written; SaveFailed if it could not be."""
        if self._failed:
            return
        try:
            with _quiet_orbax():
                self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001  whatever the background write raised
            raise self._save_failed(self._pending, e) from None
        self._pending = None

    def close(self) -> None:
        """Finish pending saves (SaveFailed if one could not be written) and release the manager."""
        try:
            self.wait_until_finished()
        finally:
            with _quiet_orbax(), contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
