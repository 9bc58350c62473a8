"""metainfo.csv, read strictly: (image file, prompt) rows, columns found by name, every bad line named by number.

The reference layout: a header row (an unnamed index column may come first), then one row per image. Refused,
with `metainfo.csv line N: ...`: bytes that are not UTF-8; a row with another number of fields than the
header (an unquoted comma, or a missing cell); a quoted field that runs over several lines (an unbalanced
quote: `3.png,"a tower with a stray quote` would otherwise swallow every following row into one prompt); an
empty image name. An empty prompt is legal (the image is trained with the empty prompt, as the tiny data of
the tests and of the README do) and `describe` names its lines; `allow_empty_prompts=False` (swd-precompute
--strict_prompts) refuses it instead. Blank lines are skipped. `MetainfoRows.lines` counts the csv's data
lines, so a caller can report rows read against lines in the file.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence

from swd_jax import storage

IMAGE_COLUMNS = ("image_path", "file_name", "filename", "image", "path")
PROMPT_COLUMNS = ("prompt", "caption", "text")


class MetainfoRows(list):
    """(file name, prompt) pairs, plus where they came from: `lines` (data lines in the file), `empty_prompts`
    (their line numbers) and `line_of` (each row's first line number)."""
    lines: int = 0
    empty_prompts: tuple[int, ...] = ()
    line_of: tuple[int, ...] = ()


def _pick_column(found: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: str) -> str:
    """Return the csv column holding `what`: `wanted` if given, else the first of `candidates` present."""
    if wanted is not None:
        if wanted not in found:
            raise ValueError(f"{path}: {what} column {wanted!r} not in the csv header {list(found)}")
        return wanted
    by_lower = {c.strip().lower(): c for c in found}
    for c in candidates:
        if c in by_lower:
            return by_lower[c]
    raise ValueError(f"{path}: no {what} column; expected one of {list(candidates)}, the header has {list(found)}")


def read_metainfo(csv_path: str, *, image_column: str | None = None, prompt_column: str | None = None,
                  allow_empty_prompts: bool = True) -> MetainfoRows:
    """Read (file name, prompt) pairs from a metainfo.csv (local or gs://), choosing its columns by name."""
    raw = storage.read_bytes(csv_path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{csv_path} line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset "
                         f"{e.start}); save the csv as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, first_line = None, 0
    rows, line_of, empty = MetainfoRows(), [], []
    last = 0  # the last physical line consumed
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{csv_path} line {last + 1}: {e} (an unbalanced quote? double a quote inside a "
                             "quoted prompt: \"\")") from None
        start, last = last + 1, reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line
        if any("\n" in f or "\r" in f for f in fields):
            raise ValueError(f"{csv_path} line {start}: a quoted field runs over lines {start}-{last}: an "
                             "unbalanced quote? (a prompt may not span lines; double a quote inside a quoted "
                             "prompt: \"\")")
        if header is None:
            header, first_line = fields, start
            image_col = header.index(_pick_column(header, image_column, IMAGE_COLUMNS, "image file", csv_path))
            prompt_col = header.index(_pick_column(header, prompt_column, PROMPT_COLUMNS, "prompt", csv_path))
            continue
        if len(fields) != len(header):
            raise ValueError(f"{csv_path} line {start}: {len(fields)} fields, the header has {len(header)} "
                             f"({', '.join(repr(h) for h in header)}): an unquoted comma in a prompt, or a missing "
                             "cell? (quote prompts that hold commas)")
        name, prompt = fields[image_col].strip(), fields[prompt_col]
        if not name:
            raise ValueError(f"{csv_path} line {start}: empty image file name")
        if not prompt.strip():
            if not allow_empty_prompts:
                raise ValueError(f"{csv_path} line {start}: empty prompt (for {name})")
            empty.append(start)
        rows.append((name, prompt))
        line_of.append(start)
    if header is None:
        raise ValueError(f"{csv_path}: empty file (no header row)")
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    rows.lines = sum(1 for ln in re.split(r"\r\n|\n|\r", text)[first_line:] if ln.strip())
    rows.empty_prompts, rows.line_of = tuple(empty), tuple(line_of)
    return rows


def describe(rows: MetainfoRows, csv_path: str) -> str:
    """One line: rows read against data lines in the file, and the lines with an empty prompt."""
    out = f"{csv_path}: {len(rows)} rows read from {rows.lines} data lines"
    if rows.empty_prompts:
        e = rows.empty_prompts
        lines = ", ".join(str(n) for n in e[:5]) + (", ..." if len(e) > 5 else "")
        out += f"; {len(e)} with an empty prompt (line {lines}), trained with the empty prompt"
    return out
