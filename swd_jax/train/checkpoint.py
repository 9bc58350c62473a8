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
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from swd_jax.convert.orbax_params import (check_no_prng_keys, with_shardings, check_matches)


def _check_json(extra: Mapping[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint `extra` must be JSON-serializable: {e}") from e
    return dict(extra)


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
        """Save if `step` is due (or `force`); returns whether it saved. Returns once arrays are on host."""
        check_no_prng_keys(state, "state")
        extra = _check_json(extra or {})
        return self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             extra=ocp.args.JsonSave(extra)), force=force)

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
        stored = self._mngr.item_metadata(step)["state"]
        target = with_shardings(abstract_state)
        check_matches(stored, target, f"{self.directory}/{step}")
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {})

    def restore_latest(self, abstract_state) -> tuple[Any, dict[str, Any]] | None:
        """`restore` of the latest complete step, or None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

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
