"""The one naming rule between diffusers module paths and our Linen scope paths.

Our modules are named as diffusers names them, except that list indices are folded into the name because
Linen names cannot be bare integers: `transformer_blocks.3` -> `transformer_blocks_3`, `to_out.0` -> `to_out_0`,
`net.0.proj` -> `net_0/proj`, `net.2` -> `net_2`. Dots become `/`.
"""
from __future__ import annotations

import re

# diffusers containers that are ModuleLists/Sequentials (index follows the name after a dot).
LIST_CONTAINERS = ("transformer_blocks", "single_transformer_blocks", "to_out", "net", "down_blocks", "up_blocks",
                   "resnets", "attentions", "upsamplers", "downsamplers", "layers", "layer", "block")

_TO_OURS = re.compile(r"(^|\.)(" + "|".join(LIST_CONTAINERS) + r")\.(\d+)(?=\.|$)")
_TO_DIFFUSERS = re.compile(r"(^|/)(" + "|".join(LIST_CONTAINERS) + r")_(\d+)(?=/|$)")


def diffusers_to_our(module_path: str) -> str:
    """`transformer_blocks.3.attn.to_out.0` -> `transformer_blocks_3/attn/to_out_0`."""
    return _TO_OURS.sub(r"\1\2_\3", module_path).replace(".", "/")


def our_to_diffusers(scope_path: str) -> str:
    """Inverse of `diffusers_to_our`."""
    return _TO_DIFFUSERS.sub(r"\1\2.\3", scope_path).replace("/", ".")
