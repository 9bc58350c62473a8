"""The FLOPs the Mosaic splash-attention kernels of a compiled TPU program execute, read from its HLO text (the
TPU compiler's cost analysis gives them none). Used by `benchmarks.tpu_plan` and `benchmarks.tpu_sampling_plan`.
"""
from __future__ import annotations

import math
import re

# FLOPs of one splash kernel per (batch x heads x query rows x key rows x head dim): forward q k^T and p v; dq
# recomputes q k^T and forms dp = do v^T and dq = ds k; dkv recomputes q k^T and forms dv, dp and dk; the fused
# backward's dkv kernel ("splash_fused") also forms dq = ds k (its results hold dq's per-key-block partials, one
# rank more than q).
SPLASH_FLOPS = {"fwd": 4, "dq": 6, "dkv": 8, "dkv_fused": 10}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_KERNEL = re.compile(r"%splash_mha_(fwd|dq|dkv)\w*\.\d+ = (\(.*?\)|\S+) custom-call.*operand_layout_constraints=\{(.*)")
_CALLEE = re.compile(r"(body|condition|to_apply|calls)=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LIMIT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def splash_flops(hlo_text: str) -> float:
    """FLOPs the splash kernels of a compiled per-device program execute, from their operand shapes.

    Counts what runs: padded sequences, the forwards that remat repeats, kernels in the fake-update loop times
    its trip count (a while body called from a computation that runs m times runs m x trips times). The trip
    count is the compiler's `known_trip_count`, else the s32 constant its condition compares the counter with
    (a `scan` counts from 0 while i < n).
    """
    kernels, calls, limits, name = {}, {}, {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name = m.group(1)
            kernels[name], calls[name], limits[name] = 0.0, [], []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None:
            continue
        limits[name] += [int(n) for n in _LIMIT.findall(line)]
        k = _KERNEL.search(line)
        if k:  # operands: 3 scalar-prefetch masks, then q [.., L, D], k [.., S, D], v, ...
            shapes = re.findall(r"\w+\[([\d,]*)\]\{", k.group(3))
            q, kv = [int(d) for d in shapes[3].split(",")], [int(d) for d in shapes[4].split(",")]
            ranks = [len(r.split(",")) for r in re.findall(r"\w+\[([\d,]*)\]", k.group(2))] or [0]
            kind = "dkv_fused" if k.group(1) == "dkv" and max(ranks) > len(q) else k.group(1)
            kernels[name] += SPLASH_FLOPS[kind] * math.prod(q) * kv[-2]
        trips = _TRIPS.search(line)
        callees = dict((kind, callee) for kind, callee in _CALLEE.findall(line))
        for kind, callee in callees.items():
            calls[name].append((callee, (kind, int(trips.group(1)) if trips else callees.get("condition"))))
    order, seen = [], set()

    def visit(c):  # depth-first post-order: every caller lands after all of its callees
        seen.add(c)
        for callee, _ in calls.get(c, []):
            if callee not in seen:
                visit(callee)
        order.append(c)

    visit(entry)
    runs_kernels = {}
    for c in order:  # callees first: does c, or anything it calls, run a splash kernel?
        runs_kernels[c] = kernels.get(c, 0) > 0 or any(runs_kernels.get(callee) for callee, _ in calls.get(c, []))

    def times(callee, kind, trips) -> int:
        if kind != "body":
            return 1
        if isinstance(trips, int):
            return trips
        if len(limits.get(trips, [])) == 1:
            return limits[trips][0]
        if runs_kernels[callee]:
            raise ValueError(f"while loop with condition {trips}: no known trip count and no single s32 limit")
        return 1  # a loop without kernels (e.g. a collective matmul's windows): its count does not matter here

    runs = {entry: 1}
    for caller in reversed(order):  # callers before callees: each callee gets every path's count
        for callee, how in calls.get(caller, []):
            runs[callee] = runs.get(callee, 0) + runs.get(caller, 0) * times(callee, *how)
    return sum(kernels[c] * r for c, r in runs.items() if c in kernels)
