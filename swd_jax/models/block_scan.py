"""Runs of identical transformer blocks under one scan over stacked parameters, and the two parameter layouts.

A full-depth SD3.5 or FLUX program unrolls 24-57 blocks: XLA compiles each copy, which takes tens of minutes on a
TPU host. Under `nn.scan` a run of identical blocks is one loop body, compiled once (MaxText's `scan_layers`).

Layouts. *Unrolled* (`transformer_blocks_3/...`, diffusers' names) is what is stored everywhere: converted
checkpoints, the trainer's orbax checkpoints, PEFT/diffusers LoRA exports. *Stacked* is the in-memory layout of a
scanned model: a group of blocks a..b lives under `{prefix}{a}_to_{b}` with a leading axis of b-a+1 (logical axis
"layers", never sharded); a group of one block keeps its own name and shape. `stack_blocks` / `unstack_blocks` map
one to the other in any pytree holding such dicts (parameters, LoRA, optimiser moments, shardings, abstract
shapes), so a run can switch between scan and unroll across a resume without changing its checkpoints.

Groups are maximal runs of blocks of one kind (MMDiT: dual-attention or not, context-pre-only; FLUX: double or
single stream) with the same remat choice, cut after every block named in `splits`: the blocks whose features the
losses tap. A feature is read, and a `features_only` forward stops, only at the end of a group.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from swd_jax.models.layers import LORA

LAYERS_AXIS = "layers"  # the logical name of the stacked axis (no sharding rule maps it: replicated)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks `start`..`start+size-1` (global indices), named `{prefix}{first}`.. in the unrolled layout."""
    prefix: str  # "transformer_blocks_" or "single_transformer_blocks_"
    first: int  # index within `prefix`'s numbering
    size: int
    start: int  # global block index (FLUX numbers double then single blocks)
    kind: Hashable
    remat: bool

    @property
    def last(self) -> int:
        return self.first + self.size - 1

    @property
    def stop(self) -> int:
        """One past the group's last global block index."""
        return self.start + self.size

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.first}" if self.size == 1 else f"{self.prefix}{self.first}_to_{self.last}"

    @property
    def members(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.first, self.last + 1)]


def block_groups(blocks: Sequence[tuple[str, int, Hashable]], *, scan: bool, splits: Sequence[int] = (),
                 plain_from: int | None = None) -> list[BlockGroup]:
    """Groups of `blocks` ((prefix, index within prefix, kind) per global index); one per block unless `scan`.

    `plain_from`: global index of the first block that runs without remat (None: every block has remat off).
    """
    groups: list[BlockGroup] = []
    split_set = set(splits)
    for g, (prefix, i, kind) in enumerate(blocks):
        remat = plain_from is not None and g < plain_from
        prev = groups[-1] if groups else None
        if (scan and prev is not None and (prev.prefix, prev.kind, prev.remat) == (prefix, kind, remat)
                and prev.stop - 1 not in split_set):
            groups[-1] = dataclasses.replace(prev, size=prev.size + 1)
        else:
            groups.append(BlockGroup(prefix, i, 1, g, kind, remat))
    return groups


def check_features(groups: Sequence[BlockGroup], feature_blocks: Sequence[int]) -> None:
    """One line if a requested feature block is inside a scanned group rather than at its end."""
    ends = {g.stop - 1 for g in groups}
    inside = sorted(set(feature_blocks) - ends)
    if inside:
        spans = [f"{g.start}..{g.stop - 1}" for g in groups
                 if g.size > 1 and any(g.start <= b < g.stop for b in inside)]
        raise ValueError(f"feature blocks {inside} fall inside scanned blocks {spans}: build the model with "
                         f"scan_splits containing them (the trainer does this for loss.cls_blocks/mmd_blocks) "
                         "or with scan_blocks=False")


def run_group(block: nn.Module, size: int, step: Callable[..., Any], carry, *broadcast):
    """`carry` after `size` applications of `step(block, carry, *broadcast)`, one set of weights per application.

    With size 1 the block is called as is (unrolled names and shapes); else under `nn.scan`, its `params` and
    `lora` collections stacked along a leading LAYERS_AXIS.
    """
    if size == 1:
        return step(block, carry, *broadcast)
    scanned = nn.scan(lambda mdl, c, *b: (step(mdl, c, *b), None),
                      variable_axes={"params": 0, LORA: 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=size,
                      metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    carry, _ = scanned(block, carry, *broadcast)
    return carry


# --- layout conversion --------------------------------------------------------------------------------------------

def _holds_blocks(groups: Sequence[BlockGroup]) -> Callable[[Any], bool]:
    names = {n for g in groups if g.size > 1 for n in g.members} | {g.name for g in groups if g.size > 1}
    return lambda x: isinstance(x, dict) and any(k in names for k in x)


def _stack_leaves(*leaves):
    x = leaves[0]
    if isinstance(x, NamedSharding):
        return NamedSharding(x.mesh, PartitionSpec(None, *x.spec))
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(x.shape), x.dtype, sharding=sh)
    if x is None:
        return None
    return jnp.stack(leaves)


def _unstack_leaf(x, n: int) -> list:
    if isinstance(x, NamedSharding):
        return [NamedSharding(x.mesh, PartitionSpec(*x.spec[1:]))] * n
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, PartitionSpec(*sh.spec[1:]))
        return [jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sh)] * n
    if x is None:
        return [None] * n
    return [x[i] for i in range(n)]


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, (NamedSharding, jax.ShapeDtypeStruct))


def _stack_dict(d: dict, groups: Sequence[BlockGroup]) -> dict:
    out = dict(d)
    for g in groups:
        if g.size == 1 or g.members[0] not in d:
            continue
        missing = [n for n in g.members if n not in d]
        if missing:
            raise ValueError(f"cannot stack blocks {g.members[0]}..{g.members[-1]}: {missing} missing")
        parts = [out.pop(n) for n in g.members]
        out[g.name] = jax.tree.map(_stack_leaves, *parts, is_leaf=_is_leaf)
    return out


def _unstack_dict(d: dict, groups: Sequence[BlockGroup]) -> dict:
    out = dict(d)
    for g in groups:
        if g.size == 1 or g.name not in d:
            continue
        stacked = out.pop(g.name)
        leaves, treedef = jax.tree.flatten(stacked, is_leaf=_is_leaf)
        per_leaf = [_unstack_leaf(x, g.size) for x in leaves]
        for j, n in enumerate(g.members):
            out[n] = jax.tree.unflatten(treedef, [p[j] for p in per_leaf])
    return out


def stack_blocks(tree, groups: Sequence[BlockGroup]):
    """Unrolled -> stacked layout, in every dict of `tree` that holds the groups' blocks (params, LoRA, Adam
    moments, NamedShardings, ShapeDtypeStructs). Arrays are stacked with jnp (jit it to place the result)."""
    holds = _holds_blocks(groups)
    return jax.tree.map(lambda x: _stack_dict(x, groups) if holds(x) else x, tree,
                        is_leaf=lambda x: holds(x) or _is_leaf(x))


def unstack_blocks(tree, groups: Sequence[BlockGroup]):
    """Stacked -> unrolled layout (the inverse of `stack_blocks`)."""
    holds = _holds_blocks(groups)
    return jax.tree.map(lambda x: _unstack_dict(x, groups) if holds(x) else x, tree,
                        is_leaf=lambda x: holds(x) or _is_leaf(x))
