"""SwD training data: image folder + metainfo.csv -> array_record (tfds) -> a sharded, resumable grain loader.

Two record kinds, one loader:
- images: `build_image_dataset` turns the reference data layout (a folder of teacher-generated images plus a
  `metainfo.csv` naming each file and its prompt) into a tensorflow-datasets dataset in the `array_record` file
  format. Each record holds the ENCODED image bytes (decoded only when loaded), the prompt and the file name.
  tfds writes and reads `array_record` without TensorFlow (`tfrecord` and `tfds.load` would need it). Text
  embeddings and VAE latents are then computed online by the encoders in the train step.
- arrays: precomputed text embeddings / latents, one record per example holding named numpy arrays (and
  strings), serialized by `encode_array_record` and written by `ArrayRecordsWriter` (plain array_record files,
  no tfds: these are not tf.Examples). A bytes value under "image" is an encoded image, decoded by the loader
  like the image kind (so prompts can be precomputed while latents are still encoded online).

`make_loader` serves either kind as an infinite stream of per-host batches of numpy arrays:
- global order: epoch e is the grain `index_shuffle` permutation with seed `seed + e` (a fresh order each
  epoch); global batch k is elements [k G, (k + 1) G) of that stream (G = hosts x per-host batch), and host h
  takes the h-th block of B of it. The hosts' records are disjoint, together cover each epoch, and the
  global batches (contents and order) are the same for any number of hosts: a run may resume on another.
- `position` counts the BATCHES a host has consumed. Batch k is a pure function of (seed, k, host), so
  resuming from position k gives exactly batches k, k+1, ... of an uninterrupted run, and the position is the
  same on every host: the checkpoint stores one integer.
- a record whose IMAGE does not decode (a corrupt image file) is skipped and counted; its slot is refilled by a
  record drawn with a generator seeded by (seed, global slot, try), which keeps the position <-> batch map
  exact. A record that cannot be READ from its file (a Riegeli hash mismatch: a bit flip, a bad copy), or an
  arrays record that does not decode, is not skipped: the loader stops with `shard_checks.CorruptShard`, one
  line naming the shard file, the record index in it, and how to redo the shard (training on a shard that is
  silently losing records would change the data without saying so).

array_record (0.8.6) opens local files only (riegeli file descriptors: a gs:// path fails with `open() failed`);
data on Cloud Storage is mounted or copied first (`shard_checks.local_data_path`), and precompute writes its
shards locally and uploads them. metainfo.csv is read strictly by `metainfo.read_metainfo` (re-exported here).

Differences from the reference loader (`src/dataset.py`): it lists image files in the folder and reads csv
columns 1 and 2 by position, shuffling with a windowed per-rank sampler; we read the csv by column NAME,
iterate over its rows (files missing from disk are skipped with a count), and shuffle globally per epoch.
Images are yielded as HWC (`uint8`, or `float32` in [-1, 1] = the reference's `2 * ToTensor(x) - 1`).
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import ml_dtypes  # bfloat16, float8_*: dtypes numpy itself does not name
import msgpack
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from swd_jax import storage
from swd_jax.train.metainfo import IMAGE_COLUMNS, PROMPT_COLUMNS, read_metainfo  # noqa: F401  (re-exported)

DATASET_NAME = "swd_images"  # the tfds builder's name: out_dir/swd_images/<version>/
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access
_ARRAY_FORMAT = "swd_arrays/v1"
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
               msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# metainfo.csv -> tfds array_record dataset
# ----------------------------------------------------------------------------------------------------------------
class IncompleteData(ValueError):
    """Precomputed data with a missing, unfinished, truncated or corrupt shard."""


class CorruptShard(IncompleteData):
    """A record of a precomputed shard that cannot be read or decoded."""


def redo_hint(folder: str, shards: list[str]) -> str:
    """How to redo `shards` of the precompute in `folder`: the command precompute.json recorded."""
    names = " and ".join(f"{os.path.basename(s)}(.json)" for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
    cmd, where = "swd-precompute with the --out that wrote it", folder
    meta = os.path.join(folder, "precompute.json")
    if os.path.exists(meta):
        try:
            with open(meta) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError):
            m = {}
        if m.get("command"):
            cmd = f"`{m['command']}`"
        if storage.is_remote(m.get("out") or ""):  # read here through a mount or a local copy: delete it there
            where = m["out"]
    return f"redo it: delete {names} in {where}, then rerun {cmd} (finished shards are skipped)"


class SwdImages(tfds.core.GeneratorBasedBuilder):
    """tfds builder: an SwD image folder + metainfo.csv -> records {image: encoded bytes, prompt, file_name}."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds 4.9.10's default `code_path` needs the `importlib_resources` backport for builders defined in a
    # package (a dependency it declares only for Python < 3.9); the answer is simply this file.
    code_path = epath.Path(__file__)

    def __init__(self, *, image_dir: str, metainfo: str = "metainfo.csv", image_column: str | None = None,
                 prompt_column: str | None = None, **kwargs):
        self._image_dir = image_dir
        self._csv_path = metainfo if os.path.isabs(metainfo) else os.path.join(image_dir, metainfo)
        self._columns = (image_column, prompt_column)
        self.num_missing = 0
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes (PNG/JPEG/...)
            "prompt": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager  # local data only
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rows = read_metainfo(self._csv_path, image_column=self._columns[0], prompt_column=self._columns[1])
        for i, (name, prompt) in enumerate(rows):
            path = os.path.join(self._image_dir, name)
            if not os.path.isfile(path):
                self.num_missing += 1
                log.warning("metainfo row %d: image %s does not exist; skipped", i, path)
                continue
            with open(path, "rb") as f:
                yield i, {"image": f.read(), "prompt": prompt, "file_name": name}
        if self.num_missing == len(rows):
            raise FileNotFoundError(f"none of the {len(rows)} images named in {self._csv_path} exist")


def build_image_dataset(image_dir: str, out_dir: str, *, metainfo: str = "metainfo.csv",
                        image_column: str | None = None, prompt_column: str | None = None) -> str:
    """Write `image_dir` (+ its metainfo.csv) as a tfds array_record dataset; return its directory."""
    builder = SwdImages(image_dir=image_dir, metainfo=metainfo, image_column=image_column,
                        prompt_column=prompt_column, data_dir=out_dir, file_format="array_record")
    builder.download_and_prepare()
    if builder.num_missing:
        log.warning("%d images named in the csv were missing and left out", builder.num_missing)
    return os.fspath(builder.data_dir)


# ----------------------------------------------------------------------------------------------------------------
# precomputed arrays: one msgpack map per record
# ----------------------------------------------------------------------------------------------------------------
def encode_array_record(arrays: Mapping[str, np.ndarray | str | bytes]) -> bytes:
    """Serialize named arrays (any numpy/ml_dtypes dtype, bf16 included), strings and bytes to bytes.

    Format (msgpack map): {"__format__": "swd_arrays/v1", name: {"dtype": str, "shape": [int], "data": bytes}
    for an array (C order), name: str for a string, name: bytes for raw bytes}.
    """
    out: dict[str, Any] = {"__format__": _ARRAY_FORMAT}
    for name, value in arrays.items():
        if not isinstance(name, str) or name.startswith("_"):
            raise ValueError(f"array record keys must be str not starting with '_', got {name!r}")
        if isinstance(value, (str, bytes)):
            out[name] = value
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc" and not hasattr(ml_dtypes, arr.dtype.name):
            raise ValueError(f"array record {name!r}: unsupported dtype {arr.dtype} (numeric arrays or str only)")
        out[name] = {"dtype": arr.dtype.name, "shape": list(arr.shape),
                     "data": np.ascontiguousarray(arr).tobytes()}
    return msgpack.packb(out, use_bin_type=True)


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def decode_array_record(data: bytes) -> dict[str, np.ndarray | str | bytes]:
    """Inverse of `encode_array_record`: bytes -> {name: np.ndarray | str}."""
    raw = msgpack.unpackb(data, raw=False)
    if not isinstance(raw, dict) or raw.get("__format__") != _ARRAY_FORMAT:
        raise ValueError(f"not an {_ARRAY_FORMAT} record")
    out: dict[str, np.ndarray | str | bytes] = {}
    for name, value in raw.items():
        if name == "__format__":
            continue
        if isinstance(value, (str, bytes)):
            out[name] = value
        else:
            out[name] = np.frombuffer(value["data"], dtype=_dtype(value["dtype"])).reshape(value["shape"])
    return out


class ArrayRecordsWriter:
    """Append `encode_array_record(arrays)` records to one array_record file; use as a context manager."""

    def __init__(self, path: str, options: str = ARRAY_RECORD_OPTIONS):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.count = 0
        self._writer = ArrayRecordWriter(os.fspath(path), options)

    def write(self, arrays: Mapping[str, np.ndarray | str]) -> None:
        self._writer.write(encode_array_record(arrays))
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ArrayRecordsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_array_records(path: str, records: Iterable[Mapping[str, np.ndarray | str]]) -> int:
    """Write every record of `records` to the array_record file `path`; return how many."""
    with ArrayRecordsWriter(path) as w:
        for r in records:
            w.write(r)
        return w.count


# ----------------------------------------------------------------------------------------------------------------
# sources and per-record decoding
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Random-access records (`len`, `[i]`) and their kind: "images" (tfds) or "arrays" (encode_array_record)."""

    records: Any
    kind: str
    files: tuple[str, ...] = ()  # array_record files, in record order ("arrays")
    ends: tuple[int, ...] = ()  # the index one past each file's last record

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        """'FILE record J' for global record `index` (or 'record INDEX' when the files are not known)."""
        if not self.files:
            return f"record {index}"
        k = int(np.searchsorted(self.ends, index, side="right"))
        return f"{self.files[k]} record {index - (self.ends[k - 1] if k else 0)}"


def array_record_files(folder: str) -> list[str]:
    """The array_record shards in `folder` (sorted): `*.array_record` and tfds' `*.array_record-i-of-n`, not
    their `<shard>.json` sidecars nor `storage.local_copy`'s `.swd_source` markers."""
    return sorted(f for f in glob.glob(os.path.join(folder, "*.array_record*"))
                  if re.search(r"\.array_record(-\d+-of-\d+)?$", f))


def open_source(path: str | Sequence[str]) -> RecordSource:
    """Open records for random access: a tfds image dataset ("images") or array_record files ("arrays").

    `path`: the directory `build_image_dataset` returned (holds dataset_info.json), or one array_record file,
    a directory or glob of them, or a list of files.
    """
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return RecordSource(tfds.builder_from_directory(path).as_data_source(split="train"), "images")
    if isinstance(path, str):
        if os.path.isdir(path):
            files = array_record_files(path)
        else:
            files = sorted(glob.glob(path))
    else:
        files = [os.fspath(p) for p in path]
    if not files:
        raise FileNotFoundError(f"no tfds dataset (dataset_info.json) or array_record files at {path!r}")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"array_record files not found: {missing[:5]}")
    from array_record.python.array_record_module import ArrayRecordReader
    counts = []
    for f in files:
        r = ArrayRecordReader(f)
        counts.append(r.num_records())
        try:
            r.close()
        except RuntimeError:  # a damaged file: its records fail to read, naming it (see _ReadRecord)
            pass
    return RecordSource(grain.sources.ArrayRecordDataSource(files), "arrays", tuple(files),
                        tuple(int(e) for e in np.cumsum(counts)))


def decode_image(data: bytes, resolution: int | None, image_dtype: str) -> np.ndarray:
    """Encoded image bytes -> HWC RGB; center-cropped to square and resized to `resolution` if given.

    Downscaling uses PIL BOX (area averaging, as the method's downscale), upscaling PIL BICUBIC.
    """
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    if resolution is not None and im.size != (resolution, resolution):
        w, h = im.size
        s = min(w, h)
        if w != h:
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((resolution, resolution), Image.BOX if s >= resolution else Image.BICUBIC)
    x_HWC = np.asarray(im, dtype=np.uint8)
    if image_dtype == "uint8":
        return x_HWC
    return x_HWC.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class _ReadRecord:
    """grain map transform: (global slot, record index) -> decoded example, refilling unreadable ones."""

    def __init__(self, rs: RecordSource, *, resolution: int | None, image_dtype: str, seed: int,
                 shard_index: int, max_retries: int):
        self.rs, self.source, self.kind = rs, rs.records, rs.kind
        self.resolution, self.image_dtype = resolution, image_dtype
        self.seed, self.shard_index, self.max_retries = seed, shard_index, max_retries

    def _corrupt(self, record_index: int, e: Exception) -> CorruptShard:
        where = self.rs.where(record_index)
        hint = redo_hint(os.path.dirname(self.rs.files[0]), [where.split(" record ")[0]]) if self.rs.files else \
            "rebuild the dataset"
        return CorruptShard(f"{where}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:160]}); {hint}")

    def _read(self, record_index: int):
        """The raw record; a read or (arrays) format error is a corrupt shard: CorruptShard, not a skip."""
        try:
            raw = self.source[record_index]
            return decode_array_record(raw) if self.kind == "arrays" else raw
        except Exception as e:  # riegeli: RuntimeError "Corrupted Riegeli/records file"; msgpack/format errors
            raise self._corrupt(record_index, e) from None

    def _decode(self, raw) -> dict[str, Any]:
        if self.kind == "arrays":
            example = raw
            if isinstance(example.get("image"), bytes):
                example["image"] = decode_image(example["image"], self.resolution, self.image_dtype)
            return example
        prompt, name = raw["prompt"], raw["file_name"]
        return {"image": decode_image(raw["image"], self.resolution, self.image_dtype),
                "prompt": prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt),
                "file_name": name.decode("utf-8") if isinstance(name, bytes) else str(name)}

    def __call__(self, slot_and_record: tuple[int, int]) -> dict[str, Any]:
        slot, record_index = slot_and_record
        record_index = int(record_index)
        for attempt in range(self.max_retries + 1):
            try:
                example = self._decode(self._read(record_index))
            except CorruptShard:
                raise
            except _UNREADABLE as e:
                log.warning("record %d unreadable (%s: %s); skipped", record_index, type(e).__name__, e)
                rng = np.random.default_rng([self.seed, slot, attempt])
                record_index = int(rng.integers(len(self.source)))
                continue
            example["record_index"] = np.int64(record_index)
            example["_skipped"] = np.int64(attempt)
            return example
        raise RuntimeError(f"{self.max_retries + 1} unreadable records in a row at slot {slot}: the data look broken")


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of examples: arrays along a new batch axis, strings into a list."""
    keys = examples[0].keys()
    for e in examples:
        if e.keys() != keys:
            raise ValueError(f"records disagree on their keys: {sorted(keys)} vs {sorted(e.keys())}")
    batch: dict[str, Any] = {}
    for k in keys:
        values = [e[k] for e in examples]
        if isinstance(values[0], (str, bytes)):
            batch[k] = values
            continue
        shapes = {np.shape(v) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {k!r}: records have shapes {sorted(shapes)} (set `resolution`?)")
        batch[k] = np.stack(values)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------------------------
class Loader:
    """Infinite iterator of per-host batches; `position` = batches consumed, `num_skipped` = unreadable records."""

    def __init__(self, dataset: grain.IterDataset, start_position: int, source_len: int):
        self.position = start_position
        self.num_skipped = 0  # by this host, since this loader was made
        self.source_len = source_len
        self._it = iter(dataset)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._it)
        self.num_skipped += int(batch.pop("_skipped").sum())
        self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        """JSON-able resume state: pass `position` back to `make_loader(start_position=...)`."""
        return {"position": self.position, "num_skipped": self.num_skipped}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_loader(source: str | Sequence[str] | RecordSource, batch_size_per_host: int, seed: int, *,
                shard_index: int | None = None, shard_count: int | None = None, start_position: int = 0,
                shuffle: bool = True, resolution: int | None = None, image_dtype: str = "uint8",
                num_threads: int = 8, prefetch_batches: int = 4, worker_count: int = 0,
                max_retries: int = 32) -> Loader:
    """An infinite, per-host-sharded, seeded, resumable grain loader over image or array records.

    Batches: dicts of stacked numpy arrays ("image" [B, H, W, 3] for images; the stored names for arrays),
    strings ("prompt", "file_name") as lists, and "record_index" [B] (int64, the source record of each row).
    `shard_index` / `shard_count` default to `jax.process_index()` / `jax.process_count()`.
    `worker_count` > 0 decodes in that many processes (grain mp_prefetch); the output does not change.
    """
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if batch_size_per_host < 1 or start_position < 0:
        raise ValueError(f"need batch_size_per_host >= 1 and start_position >= 0, "
                         f"got {batch_size_per_host}, {start_position}")
    if image_dtype not in ("uint8", "float32"):
        raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {image_dtype!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    rs = source if isinstance(source, RecordSource) else open_source(source)
    src, kind = rs.records, rs.kind
    n = len(src)
    if n == 0:
        raise ValueError("the data source has no records")

    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # epoch e uses seed + e, see module docstring
    stream, per, hosts = ds.repeat(), batch_size_per_host, shard_count

    def global_slot(j: int) -> tuple[int, int]:  # host example j -> (its index in the global stream, record)
        g = (j // per) * per * hosts + shard_index * per + j % per
        return g, int(stream[g])

    ds = grain.MapDataset.range(len(stream) // hosts).map(global_slot)
    ds = ds.map(_ReadRecord(rs, resolution=resolution, image_dtype=image_dtype, seed=seed,
                            shard_index=shard_index, max_retries=max_retries))
    ds = ds.batch(batch_size_per_host, batch_fn=_collate)[start_position:]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=max(prefetch_batches, num_threads)))
    if worker_count > 0:
        from absl import flags  # grain's mp_prefetch reads an absl flag; outside absl.app.run use defaults
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Loader(it_ds, start_position, n)
