"""Model folders wherever they are: a local path as is, a `gs://` folder as a cached local copy of the parts read.

Readers that need real files (memory-mapped safetensors, transformers' tokenizers) take `local_model_folder(path)`.
For a diffusers pipeline folder on Cloud Storage only its top-level JSON files and the component subfolders asked
for are downloaded (a hub snapshot also holds single-file checkpoints of several GB at its top level); any other
folder (a transformer folder, a LoRA adapter) is downloaded whole. JSON files of a converted checkpoint are read
through `swd_jax.storage`; its orbax params are read from `gs://` directly.
"""
from __future__ import annotations

import json
import os
from typing import Any

from swd_jax import storage

PIPELINE_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
NOT_TRANSFORMER = tuple(p for p in PIPELINE_PARTS if p != "transformer")


def local_model_folder(path: str, parts: tuple[str, ...] | None = PIPELINE_PARTS, what: str = "model folder") -> str:
    """`path` itself when local; for `gs://`: a local copy of a pipeline folder's top-level JSON files and the
    subfolders in `parts` (None: everything), or of the whole folder when it is no pipeline folder."""
    if not storage.is_remote(path):
        return path
    path = storage.resolve(path)
    names = storage.listdir(path)
    if not names:
        raise FileNotFoundError(f"{what} {path} not found (or empty)")
    subfolders = [n for n in names if n in PIPELINE_PARTS and not n.endswith(".json")
                  and storage.isdir(storage.join(path, n))]
    if parts is None or not subfolders:  # not a pipeline folder: everything
        return storage.local_copy(path, what=what)
    local = None
    for name in names:
        if name in parts or (name.endswith(".json") and storage.isfile(storage.join(path, name))):
            got = storage.local_copy(storage.join(path, name), what=what)
            local = os.path.dirname(got)
    return local if local is not None else storage.local_copy(path, what=what)


def read_json(path: str, what: str = "file") -> Any:
    """A JSON file, local or `gs://`; a missing file or invalid JSON raises with one line naming it."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def source_path(original: str, local_root: str, local_sub: str) -> str:
    """Where `local_sub` (inside `local_copy`'s `local_root` of `original`) is in the original location."""
    rel = os.path.relpath(local_sub, local_root)
    return original if rel == "." else storage.join(original, *rel.split(os.sep))


def local_transformer_folder(path: str) -> str:
    """The local transformer folder of a diffusers pipeline or transformer folder (local or gs://; of a pipeline
    on Cloud Storage only transformer/ is downloaded)."""
    local = local_model_folder(path, parts=("transformer",))
    sub = os.path.join(local, "transformer")
    return sub if os.path.isdir(sub) else local
