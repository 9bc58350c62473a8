"""Prompt sets (the official COCO / MJHQ CSVs) and the image index a generate run writes for evaluation.

Prompt CSV: the official `src/prompts/coco.csv`, `mjhq.csv`; the prompts are its `caption` column, first N
rows (`eval.prepare_val_prompts`; the paper uses N = 5008). Seeds: image i of a run with base seed S uses
seed S + i (`sample_seed`), so any subset can be regenerated.

Image index (`images.json` in the image folder), written by the generate command, read by evaluate:
    [{"file": "00000.png", "prompt": "A green train ...", "seed": 0}, ...]
`file` is relative to the folder holding `images.json`; order is the evaluation order; `seed` is optional.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

OFFICIAL_NUM_SAMPLES = 5008
INDEX_NAME = "images.json"


def read_captions(path: str, limit: int | None = OFFICIAL_NUM_SAMPLES) -> list[str]:
    """The first `limit` prompts of a prompt CSV's `caption` (or `prompt`) column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        column = next((c for c in ("caption", "prompt") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{path}: no 'caption' or 'prompt' column (columns: {reader.fieldnames})")
        captions = [row[column] for row in reader]
    return captions if limit is None else captions[:limit]


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of image `index` of a run (deterministic, independent of batching and devices)."""
    return base_seed + index


def write_index(folder: str, entries: Sequence[dict]) -> str:
    """Write `images.json` (entries with `file`, `prompt`, optional `seed`) into `folder`; returns its path."""
    for e in entries:
        if not isinstance(e.get("file"), str) or not isinstance(e.get("prompt"), str):
            raise ValueError(f"image index entry needs string 'file' and 'prompt': {e}")
    path = os.path.join(folder, INDEX_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(entries), f, indent=1, ensure_ascii=False)
    return path


def read_index(path: str) -> list[dict]:
    """Entries of an `images.json` (a folder holding one, or the file), with `file` made absolute; bad
    entries and missing image files raise."""
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image index {path} not found (a JSON list of {{'file', 'prompt', 'seed'}})")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'file', 'prompt', 'seed'}} entries")
    root, out = os.path.dirname(os.path.abspath(path)), []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("prompt"), str):
            raise ValueError(f"{path}: entry {i} needs string 'file' and 'prompt', got {e!r}")
        file = os.path.join(root, e["file"])
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: entry {i}: image {file} not found")
        out.append({**e, "file": file})
    return out
