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
`restore` recomputes them and raises `CorruptCheckpoint` naming the step and the arrays that differ;
`restore_latest` then warns and falls back to the previous step (also for a step folder orbax cannot read:
truncated or deleted files, an empty folder, bad metadata), and raises if every kept step is broken: it
never returns garbage and never silently starts over. A step the caller found to produce non-finite losses
is moved aside by `quarantine` (renamed `<step>.nonfinite`), so the next run resumes from the one before.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from swd_jax.convert.orbax_params import check_no_prng_keys, with_shardings, check_matches

log = logging.getLogger(__name__)
CHECKSUMS = "_checksums"  # reserved key of `extra`: {leaf path: checksum}


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose files cannot be read or whose arrays do not match their saved checksums."""


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


def _one_line(e) -> str:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    return text.strip().splitlines()[0][:300] if text.strip() else text


# ----------------------------------------------------------------------------------------------------------------
# the training checkpointer
# ----------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Every `save_every` steps save {state pytree, extra JSON} asynchronously to `directory`, keeping `keep`."""

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"need save_every >= 1 and keep >= 1, got {save_every}, {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args_cls in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args_cls, ocp.StandardCheckpointHandler)
        for args_cls in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("extra", args_cls, ocp.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (a multiple of save_every not already saved)."""
        return self._mngr.should_save(step)

    def save(self, step: int, state, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Save if `step` is due (or `force`); returns whether it saved. Returns once arrays are on host.

        Raises FloatingPointError (and writes nothing) when a leaf of `state` holds a NaN or an infinity.
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
        return self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             extra=ocp.args.JsonSave(extra)), force=True)

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
        src, dst = os.path.join(self.directory, str(step)), os.path.join(self.directory, f"{step}.nonfinite")
        if jax.process_index() == 0:
            if os.path.exists(dst):
                import shutil
                shutil.rmtree(dst)
            os.replace(src, dst)
            with open(os.path.join(dst, "REASON.txt"), "w") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine {step}")
        self._mngr.reload()
        return dst

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
        where = os.path.join(self.directory, str(step))
        target = with_shardings(abstract_state)
        try:
            stored = self._mngr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001  orbax raises many types for missing / garbled metadata
            stored, error = None, e
        if not _all_processes_ok(stored is not None):
            raise CorruptCheckpoint(f"{where}: unreadable metadata ({_one_line(error if stored is None else '')})")
        check_matches(stored, target, where)  # a structure mismatch is a config change: never a fallback
        out, error = None, None
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   extra=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  truncated / garbled array files, bad JSON
            error = e
        if not _all_processes_ok(out is not None):
            raise CorruptCheckpoint(f"{where}: cannot read it ({_one_line(error) if error else 'on another process'})")
        extra = dict(out["extra"] or {})
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

    def restore_latest(self, abstract_state) -> tuple[Any, dict[str, Any]] | None:
        """`restore` of the latest step that reads back intact, or None when there is no step at all.

        A broken step (CorruptCheckpoint) is skipped with a warning naming it; if every step is broken this
        raises CorruptCheckpoint rather than start over.
        """
        broken = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                out = self.restore(step, abstract_state)
            except CorruptCheckpoint as e:
                print(f"WARNING: checkpoint step {step} is broken, trying the previous one: {e}", flush=True,
                      file=sys.stderr)
                broken.append(step)
                continue
            return out
        if broken:
            raise CorruptCheckpoint(f"every checkpoint in {self.directory} is broken (steps {broken}); move them "
                                    "away to start over")
        return None

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
