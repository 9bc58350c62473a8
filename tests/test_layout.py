"""The package's layout: each part imports only itself and the parts below it, and no modules import each other.

Parts, top to bottom (README "Layout"; a part that needs something from above it means the thing lives in the wrong
part: move it down):

    cli       the console scripts: argument parsing, one contract
    demo      the digits default (toy data, teacher training, yardsticks, the tiny kit)
    train     the trainer: loop, steps, setup, data, checkpoints, sharding, validation, distributed
    pipeline  prompts -> images for any backbone; never the trainer
    eval      FID / CLIP score / PickScore protocol
    convert   diffusers / transformers / PEFT / pytorch-fid files <-> params; every loader, the prompt encoders
    models    MMDiT, FLUX, VAE, text encoders, Inception and CLIP vision, attention kernels, the backbone record
    method    schedule, resize, sampler, losses, discriminator head: pure functions of arrays and params
    files     storage (local and gs://), image files, the NumPy reference kit

`models` sits above `method`: the FID Inception resizes its input with the torch-exact `method.resize`, and the
method imports no model. Every import counts, at module level or inside a function; a package's `__main__.py`
(`python -m swd_jax.train`) only hands over to `swd_jax.cli` and is not a part.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "swd_jax"
PARTS = ("cli", "demo", "train", "pipeline", "eval", "convert", "models", "method", "files")
FILES = {"storage", "image_files", "testing", "__init__"}  # top-level modules of the bottom part


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in FILES):
        return "files"
    if len(parts) == 2 and parts[1] == "pipeline":
        return "pipeline"
    if parts[1] not in PARTS:
        raise AssertionError(f"{module}: in no part of {PARTS}; add it to one (and to this test's docstring)")
    return parts[1]


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The swd_jax modules `path` imports (`from swd_jax.x import y` counts swd_jax.x.y when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("swd_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("swd_jax"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, set(modules)) - {m} for m, p in modules.items() if not m.endswith("__main__")}


def test_parts_import_only_downwards():
    rank = {p: i for i, p in enumerate(PARTS)}
    bad = [f"{m} ({_part(m)}) imports {d} ({_part(d)})" for m, deps in sorted(_graph().items()) for d in sorted(deps)
           if rank[_part(d)] < rank[_part(m)]]
    assert not bad, "imports that reach up the layout:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph, cycles, state = _graph(), [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_main_modules_only_hand_over_to_cli():
    for name, path in _modules().items():
        if name.endswith("__main__"):
            deps = _imports(path, set(_modules()))
            assert deps and all(_part(d) == "cli" for d in deps), f"{path}: imports {sorted(deps)}, expected swd_jax.cli only"


def test_the_layout_check_can_fail():
    """The checks see a reach upwards and a cycle when one is there (the graph of a made-up package)."""
    rank = {p: i for i, p in enumerate(PARTS)}
    assert rank[_part("swd_jax.pipeline")] < rank[_part("swd_jax.convert.text")]  # convert -> pipeline: upwards
    assert _part("swd_jax.storage") == "files" and _part("swd_jax.train.loop") == "train"
    assert "swd_jax.models.layers" in _graph()["swd_jax.models.mmdit"]  # lazy and `from x import module` both count
