"""Device mesh and logical-axis sharding rules (jax.jit with NamedSharding; no pjit).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...); a config's `rules` map them to mesh axes.
The default: base weights FSDP-sharded over `fsdp` along their model dimension, MLP/attention widths over
`tensor`, and the batch split over `data` x `fsdp` (every device sees different examples).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from swd_jax.models.partitioning import axes_size  # noqa: F401  (re-exported: part of this module's API)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("adaln", "tensor"),
    ("joint", None),
    ("head_dim", None),
    ("embed_out", None),
    ("activation_batch", BATCH_AXES),
    ("activation_tokens", None),
    ("activation_embed", None),
)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh of `shape` over `axes` with Auto axis types; one -1 entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} entries for axes {tuple(axes)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices do not divide into mesh shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, there are {len(devices)}")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES, shapes=None):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`.

    With `shapes` (the same pytree of arrays or ShapeDtypeStructs), a dimension that its mesh axes do not
    divide evenly is replicated instead (e.g. SD3.5-Large's 1824-wide discriminator layer, or its 2432-wide
    weights on 128-way FSDP): the array still places, at the cost of that one dimension's memory saving.
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))
    return shardings if shapes is None else jax.tree.map(_divisible, shardings, shapes)


def boxed_shardings(boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """`logical_shardings` of an abstract tree boxed with logical names (`jax.eval_shape` of a Linen init),
    fitted to its shapes."""
    return logical_shardings(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.unbox(boxed))


def _divisible(sh: NamedSharding, x) -> NamedSharding:
    spec = list(sh.spec) + [None] * (len(x.shape) - len(sh.spec))
    for i, axes in enumerate(spec):
        if x.shape[i] % axes_size(sh.mesh, axes):
            spec[i] = None
    return NamedSharding(sh.mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Shard dimension `leading_axes` (the batch) over data x fsdp; earlier dimensions are replicated."""
    return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(global_batch: int, mesh: Mesh):
    n = batch_divisor(mesh)
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the data x fsdp mesh axes "
                         f"({dict((a, mesh.shape[a]) for a in BATCH_AXES)} = {n} shards)")
