"""Orbax parameter trees: strict abstract targets and comparison, one-off save/load of converted weights.

`save_params` / `load_params` write and read one pytree of arrays (e.g. the converted base transformer) in an
orbax checkpoint directory, atomically. Loading is strict: the stored tree must have exactly the keys, shapes
and dtypes of the abstract target (`jax.ShapeDtypeStruct`s); any difference raises a ValueError naming the keys.
Arrays are read straight into the target's shardings (a leaf with no sharding is restored replicated).
Typed PRNG keys are refused: store `jax.random.key_data(key)` instead. The trainer's checkpoints
(`swd_jax.train.checkpoint`) use the same checks.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from swd_jax import storage

_MAX_LISTED = 20  # differences listed in a mismatch error


# ----------------------------------------------------------------------------------------------------------------
# trees: abstract targets and strict comparison
# ----------------------------------------------------------------------------------------------------------------
def _key_str(entry) -> str:
    """One key-path entry as text: dict key, sequence index or (namedtuple) attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree) -> dict[str, Any]:
    """{"a/b/0/count": leaf} for every leaf of `tree` (None leaves dropped, as orbax drops them)."""
    return {"/".join(_key_str(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_no_prng_keys(tree, what: str) -> None:
    keys = [k for k, v in _flat(tree).items()
            if hasattr(v, "dtype") and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)]
    if keys:
        raise TypeError(f"{what} holds typed PRNG keys at {keys}: store jax.random.key_data(key) instead")


def abstract_like(tree) -> Any:
    """The restore target for `tree`: a ShapeDtypeStruct per array leaf, carrying that array's sharding."""
    def one(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


def with_shardings(abstract) -> Any:
    """Give every leaf a sharding: its own, or replicated over all devices."""
    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
                                            jax.sharding.PartitionSpec())

    def one(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"abstract leaves must be jax.ShapeDtypeStruct (or arrays), got {type(x).__name__}")
        sharding = getattr(x, "sharding", None) or replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, abstract)


def check_matches(stored_metadata, abstract, where: str) -> None:
    """Raise ValueError naming every key that is missing, unexpected, or of another shape/dtype."""
    stored, wanted = _flat(stored_metadata), _flat(abstract)
    missing = sorted(wanted.keys() - stored.keys())
    unexpected = sorted(stored.keys() - wanted.keys())
    differ = []
    for k in sorted(wanted.keys() & stored.keys()):
        s, w = stored[k], wanted[k]
        if tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
            differ.append(f"{k}: stored {tuple(s.shape)} {np.dtype(s.dtype)}, "
                          f"expected {tuple(w.shape)} {np.dtype(w.dtype)}")
    if missing or unexpected or differ:
        lines = [f"checkpoint {where} does not match the expected state:"]
        for title, items in (("missing from the checkpoint", missing),
                             ("in the checkpoint but not expected", unexpected), ("shape/dtype differ", differ)):
            if items:
                more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                lines.append(f"  {title}: " + "; ".join(items[:_MAX_LISTED]) + more)
        raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# one-off parameter trees (converted base weights)
# ----------------------------------------------------------------------------------------------------------------
def save_params(path: str, params, *, overwrite: bool = False) -> None:
    """Write one pytree of arrays to the orbax checkpoint directory `path` (atomically); blocks until done."""
    check_no_prng_keys(params, "params")
    path = storage.resolve(path)  # local (absolute) or gs://, which orbax writes directly
    if storage.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=overwrite)
        ckptr.wait_until_finished()


def tree_metadata(path: str):
    """The stored tree (shapes, dtypes) of the orbax pytree folder `path`, read by its handler alone.

    `Checkpointer.metadata` also reads the step's `_CHECKPOINT_METADATA`, which a pytree that is one item of a
    training checkpoint (`<step>/state`) does not hold (it is in `<step>/`): absl would warn on every read."""
    from etils import epath
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(path))
    finally:
        handler.close()


def load_params(path: str, abstract) -> Any:
    """Read the pytree at `path` into `abstract`'s shapes, dtypes and shardings; strict like `restore`."""
    check_no_prng_keys(abstract, "abstract")
    path = storage.resolve(path)  # local (absolute) or gs://, which orbax reads directly
    if not storage.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    target = with_shardings(abstract)
    check_matches(tree_metadata(path), target, path)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)
