"""Precomputed shards: their checksums, the trainer's start-up check (`data.verify`), and gs:// data paths.

Precompute writes beside every shard `<shard>.json` = {rows, skipped_bad, bytes, crc32c} (the file's size and
CRC32C, the checksum Cloud Storage itself keeps), and records in `precompute.json` how it was run, so every
message here can say how to redo a shard. The trainer checks at start-up (`check_precomputed`):
- always (`data.verify="fast"`, the default): no `.partial` shard, no shard missing, every sidecar present,
  every shard of the size and row count its sidecar says, and a few records of every shard (first, middle,
  last; at most `FAST_SAMPLES` in all) read and decoded;
- `data.verify="full"`: also the CRC32C of every shard's bytes against its sidecar (a whole read of the data;
  shards written before checksums were recorded are decoded record by record instead).
A record that fails to read later, mid-run, stops the run naming the shard and the record (`CorruptShard`,
raised by the loader); a corrupt IMAGE inside a record is skipped instead (see `records`).

Cloud Storage: array_record (0.8.6) reads and writes through riegeli file descriptors, so it cannot open a
`gs://` path at all (`open() failed: No such file or directory`). A gs:// `data.path` is therefore refused
(`local_data_path`) with the fix: mount the bucket with gcsfuse (`launch/tpu_pod.sh --mount gs://BUCKET`
mounts it at /mnt/gcs/BUCKET on every worker) and point data.path there; or, for data that fits the local
disk, `data.copy_to_local=True` downloads it to each host's cache first (`storage.local_copy`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from swd_jax import storage
from swd_jax.train.records import CorruptShard, IncompleteData, decode_array_record, redo_hint  # noqa: F401 (re-exported)

SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.array_record$")
VERIFY = ("fast", "full")
FAST_SAMPLES = 256  # records decoded by the fast check, at most (3 per shard)
MOUNT_ROOT = "/mnt/gcs"  # where launch/tpu_pod.sh --mount puts a bucket


def shard_name(i: int, n: int) -> str:
    """The file name of precompute shard i of n."""
    return f"precomputed-{i:05d}-of-{n:05d}.array_record"


def file_crc32c(path: str, chunk: int = 1 << 22) -> str:
    """CRC32C of a local file's bytes, as 8 hex digits."""
    import google_crc32c
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            c.update(block)
    return c.hexdigest().decode()


def shard_sidecar(path: str, rows: int, skipped_bad: int) -> dict:
    """The `<shard>.json` of a finished local shard file."""
    return {"rows": rows, "skipped_bad": skipped_bad, "bytes": os.path.getsize(path), "crc32c": file_crc32c(path)}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise IncompleteData(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _close(reader) -> None:
    try:
        reader.close()
    except RuntimeError:  # a reader of a damaged file reports its error again on close
        pass


def _decode(reader, f: str, folder: str, indices) -> None:
    for j in indices:
        try:
            decode_array_record(reader.read([j])[0])
        except Exception as e:  # riegeli hash mismatch (RuntimeError), msgpack/format errors (ValueError, ...)
            _close(reader)
            raise CorruptShard(f"{f} record {j}: unreadable ({type(e).__name__}: {str(e)[:160]}); "
                               f"{redo_hint(folder, [f])}") from None


def check_precomputed(path: str, files: list[str], verify: str = "fast") -> int:
    """Start-up check of `swd-precompute` output (see the module doc); its row count, or -1 for hand-made files.

    Refused (IncompleteData): `.partial` shards, shard names `-i-of-N` with an index missing or with several N,
    N not what precompute.json's n_rows / shard_size give, a shard whose sidecar is missing (when precompute
    recorded checksums) or whose size, row count or sampled records disagree with it, and with verify="full"
    a CRC32C mismatch. Rows precompute skipped as unreadable (`--skip_bad`) are counted in a warning.
    """
    if verify not in VERIFY:
        raise ValueError(f"data.verify={verify!r}; expected 'fast' (sizes, row counts and a few records per shard) "
                         "or 'full' (also every shard's checksum: reads all the data)")
    partial = sorted(glob.glob(os.path.join(path, "*.partial")))
    if partial:
        raise IncompleteData(f"{path}: unfinished precompute output {[os.path.basename(p) for p in partial]}; "
                             "rerun `swd-precompute` with the same --out to finish it")
    meta_path = os.path.join(path, "precompute.json")
    meta = _read_json(meta_path) if os.path.exists(meta_path) else {}
    named = {f: SHARD_NAME.search(os.path.basename(f)) for f in files}
    if not all(named.values()):
        return -1  # hand-made files (no -i-of-N names): nothing to check against
    totals = {int(m.group(2)) for m in named.values()}
    if len(totals) > 1:
        raise IncompleteData(f"{path}: shards of different precomputes (-of-{sorted(totals)}) in one folder")
    n = totals.pop()
    if meta.get("n_rows") and meta.get("shard_size") and n != -(-meta["n_rows"] // meta["shard_size"]):
        raise IncompleteData(f"{path}: {n} shards, but {meta_path} says {meta['n_rows']} rows in shards of "
                             f"{meta['shard_size']}")
    have = {int(m.group(1)): f for f, m in named.items()}
    missing = sorted(set(range(n)) - set(have))
    if missing:
        raise IncompleteData(f"{path}: {len(missing)} of {n} shards missing: "
                             f"{[shard_name(i, n) for i in missing[:5]]}; rerun precompute with the same --out")
    from array_record.python.array_record_module import ArrayRecordReader
    rows = skipped = 0
    per_shard = max(1, min(3, FAST_SAMPLES // max(1, len(have))))
    for i, f in sorted(have.items()):
        side = f + ".json"
        info = _read_json(side) if os.path.exists(side) else None
        if info is None and meta.get("checksums"):
            raise IncompleteData(f"{side} missing (the shard's row count and checksum); {redo_hint(path, [f])}")
        if info is not None:
            expected, skipped = info["rows"], skipped + info.get("skipped_bad", 0)
        elif meta.get("n_rows") and meta.get("shard_size"):
            expected = min(meta["shard_size"], meta["n_rows"] - i * meta["shard_size"])
        else:
            expected = None
        size = os.path.getsize(f)
        if info is not None and "bytes" in info and size != info["bytes"]:
            raise IncompleteData(f"{f}: {size} bytes, precompute wrote {info['bytes']}: truncated or overwritten; "
                                 f"{redo_hint(path, [f])}")
        reader = ArrayRecordReader(f)
        got = reader.num_records()
        if got == 0 or (expected is not None and got != expected):
            _close(reader)
            raise IncompleteData(f"{f}: holds {got} rows, expected {expected or 'some'}: truncated or overwritten; "
                                 "delete it and rerun precompute with the same --out")
        if verify == "full" and info is not None and "crc32c" in info:
            crc = file_crc32c(f)
            if crc != info["crc32c"]:
                _close(reader)
                raise CorruptShard(f"{f}: checksum mismatch (crc32c {crc}, precompute recorded {info['crc32c']}): "
                                   f"the file changed since it was written; {redo_hint(path, [f])}")
        elif verify == "full":
            _decode(reader, f, path, range(got))
        _decode(reader, f, path, sorted({0, got // 2, got - 1})[:per_shard])
        _close(reader)
        rows += got
    if skipped:
        print(f"{path}: {skipped} rows were skipped by precompute --skip_bad (unreadable images); training on "
              f"{rows}", file=sys.stderr)
    return rows


def _remote_sizes(path: str) -> dict[str, int]:
    fs = storage._fs()
    key = path[len(storage.GCS):].rstrip("/")
    return {p: int(d.get("size") or 0) for p, d in fs.find(key, detail=True).items()}


def local_data_path(path: str, copy_to_local: bool = False, what: str = "data.path") -> str:
    """A local folder for `path`: itself when local; a gs:// path is refused with the fix (mount the bucket),
    or with `copy_to_local` downloaded into this host's cache (refused if it does not fit with a 10 % margin)."""
    if not storage.is_remote(path):
        return path
    path = storage.resolve(path)
    if not copy_to_local:
        bucket, _, key = path[len(storage.GCS):].partition("/")
        raise ValueError(
            f"{what}={path}: array_record shards cannot be read from gs:// directly; mount the bucket with gcsfuse "
            f"(`launch/tpu_pod.sh --mount gs://{bucket}` mounts it at {MOUNT_ROOT}/{bucket} on every worker) and "
            f"pass --config.data.path={MOUNT_ROOT}/{bucket}/{key}, or pass --config.data.copy_to_local=True to "
            "download it to each host's local disk")
    if not storage.exists(path):
        raise FileNotFoundError(f"{what}={path} not found")
    need = sum(_remote_sizes(path).values())
    root = os.environ.get("SWD_GCS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "swd_jax", "gcs")
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    cached = 0
    local_guess = os.path.join(root, path[len(storage.GCS):])
    for dirpath, _, names in os.walk(local_guess):
        cached += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    if (need - cached) * 1.1 > free:
        raise ValueError(f"{what}={path}: {need / 1e9:.1f} GB does not fit {probe} ({free / 1e9:.1f} GB free, "
                         "10 % margin kept); mount the bucket with gcsfuse instead (`launch/tpu_pod.sh --mount "
                         f"gs://BUCKET`, then --config.data.path={MOUNT_ROOT}/BUCKET/...) or set $SWD_GCS_CACHE to "
                         "a larger disk")
    print(f"{what}: copying {path} ({need / 1e9:.2f} GB) to the local cache...", file=sys.stderr)
    return storage.local_copy(path, what=what)
