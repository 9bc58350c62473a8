"""Fault rows for the data path (collected by tests/test_faults.py; the contract is tests/fault_table.py).

Trainer rows run `swd-train --config tiny` on a small hand-made precompute folder (6 or 16 records of one small
array, precompute's sidecars with CRC32C, built once per session and copied per row) with one fault in it;
precompute rows run `swd-precompute` on a 12-image folder with one bad csv line or image. Rows whose fault
is refused before any model loads pass a model path that does not exist; the others build the tiny SD3
pipeline of tests/test_prompt_encoding once per session.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from tests.fault_table import FaultCase, run_cli

N_SHARDS, PER_SHARD = 2, 8
REDO = r"redo it: delete .* then rerun `swd-precompute --model M"


# ----------------------------------------------------------------------------------------------------------------
# the trainer's side: a hand-made precompute folder
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _precomputed() -> tuple[str, int, int]:
    """(folder, offset of a byte whose flip breaks record 0 of shard 1, one that breaks its record 3)."""
    from array_record.python.array_record_module import ArrayRecordReader

    from swd_jax.train.shard_checks import shard_name
    from swd_jax.train.records import write_array_records
    from swd_jax.train.shard_checks import shard_sidecar
    d = tempfile.mkdtemp(prefix="swd_fault_pre_")
    rng = np.random.default_rng(0)
    for i in range(N_SHARDS):
        f = os.path.join(d, shard_name(i, N_SHARDS))
        write_array_records(f, [{"x": rng.standard_normal(256).astype(np.float32)} for _ in range(PER_SHARD)])
        with open(f + ".json", "w") as s:
            json.dump(shard_sidecar(f, PER_SHARD, 0), s)
    with open(os.path.join(d, "precompute.json"), "w") as f:
        json.dump({"format": 2, "n_rows": N_SHARDS * PER_SHARD, "shard_size": PER_SHARD, "checksums": True,
                   "command": f"swd-precompute --model M --data D --out {d} --scales 8,12,16"}, f)
    np.savez(os.path.join(d, "uncond.npz"), prompt_embeds=np.zeros((1, 4, 8)), pooled_prompt_embeds=np.zeros((1, 8)))
    shard = os.path.join(d, shard_name(1, N_SHARDS))
    data = open(shard, "rb").read()
    found = {}
    probe = os.path.join(d, "probe")
    for off in range(64, len(data), 61):  # a flip that breaks exactly one record, for records 0 and 3
        b = bytearray(data)
        b[off] ^= 0x10
        open(probe, "wb").write(bytes(b))
        r = ArrayRecordReader(probe)
        bad = []
        for j in range(r.num_records()):
            try:
                r.read([j])
            except Exception:
                bad.append(j)
        r.close()
        if len(bad) == 1 and bad[0] in (0, 3):
            found.setdefault(bad[0], off)
        if len(found) == 2:
            break
    os.remove(probe)
    return d, found[0], found[3]


def _data_copy(tmp_path: pathlib.Path) -> str:
    dst = str(tmp_path / "pre")
    shutil.copytree(_precomputed()[0], dst)
    json_path = os.path.join(dst, "precompute.json")
    meta = json.load(open(json_path))
    meta["command"] = meta["command"].replace(_precomputed()[0], dst)
    json.dump(meta, open(json_path, "w"))
    return dst


def _shard(folder: str, i: int) -> str:
    from swd_jax.train.shard_checks import shard_name
    return os.path.join(folder, shard_name(i, N_SHARDS))


def _flip(path: str, offset: int) -> None:
    b = bytearray(open(path, "rb").read())
    b[offset] ^= 0x10
    open(path, "wb").write(bytes(b))


def _train(tmp_path: pathlib.Path, data_path: str, *extra: str) -> tuple[int, str]:
    from swd_jax.cli.train import main
    return run_cli(main, ["--config", "tiny", "--workdir", str(tmp_path / "run"), "--config.data.kind=precomputed",
                          "--config.mesh.shape=1,-1,1", f"--config.data.path={data_path}", *extra])


def _train_with(fault):
    def run(tmp_path):
        d = _data_copy(tmp_path)
        extra = fault(d) or ()
        return _train(tmp_path, d, *extra)
    return run


def _bitflip_fast(d):
    _flip(_shard(d, 1), _precomputed()[1])  # record 0: one the fast check samples


def _bitflip_full(d):
    _flip(_shard(d, 1), _precomputed()[2])  # record 3: one the fast check does not sample
    return ("--config.data.verify=full",)


def _truncated(d):
    f = _shard(d, 0)
    os.truncate(f, os.path.getsize(f) // 2)


def _partial(d):
    os.rename(_shard(d, 1), _shard(d, 1).replace(".array_record", ".partial"))


# ----------------------------------------------------------------------------------------------------------------
# precompute's side: an image folder + metainfo.csv
# ----------------------------------------------------------------------------------------------------------------
def _images(folder: pathlib.Path, lines: list[str] | None = None) -> pathlib.Path:
    """12 small PNGs and their metainfo.csv (`lines` replaces the csv's data lines)."""
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    lines = lines or [f"{i}.png,a tower number {i}" for i in range(12)]
    (folder / "metainfo.csv").write_text("\n".join(["file_name,prompt", *lines]) + "\n")
    return folder


def _csv_with(line4: str):
    """Images whose csv line 5 (the row of 3.png) is `line4`."""
    lines = [f"{i}.png,a tower number {i}" for i in range(12)]
    lines[3] = line4
    return lines


@functools.lru_cache(maxsize=None)
def _model() -> str:
    from tests import test_prompt_encoding as tpe

    class Factory:
        def mktemp(self, name):
            return pathlib.Path(tempfile.mkdtemp(prefix=f"swd_fault_{name}_"))

    return str(tpe.sd3.__wrapped__(Factory())[1])


def _precompute(tmp_path: pathlib.Path, data: pathlib.Path, *extra: str, model: str | None = None):
    from swd_jax.cli.precompute import main
    from tests.test_prompt_encoding import T5_LEN
    return run_cli(main, ["--model", model or str(tmp_path / "no_model"), "--data", str(data),
                          "--out", str(tmp_path / "out"), "--scales", "4,8", "--shard_size", "6",
                          "--dtype", "float32", "--param_dtype", "float32", "--store_dtype", "float32",
                          "--max_sequence_length", str(T5_LEN), *extra])


def _csv_case(line4: str, *extra: str):
    return lambda tmp_path: _precompute(tmp_path, _images(tmp_path / "data", _csv_with(line4)), *extra)


def _missing_image(tmp_path):
    data = _images(tmp_path / "data")
    (data / "3.png").unlink()
    return _precompute(tmp_path, data)


def _corrupt_image(*extra: str):
    def run(tmp_path):
        data = _images(tmp_path / "data")
        (data / "3.png").write_bytes(b"not a png at all")
        return _precompute(tmp_path, data, *extra, model=_model())
    return run


def _empty_prompt_kept(tmp_path):
    return _precompute(tmp_path, _images(tmp_path / "data", _csv_with("3.png,")), model=_model())


def _not_utf8(tmp_path):
    data = _images(tmp_path / "data")
    with open(data / "metainfo.csv", "ab") as f:
        f.write(b"12.png,caf\xe9 au lait\n")
    return _precompute(tmp_path, data)


def _records_in(n: int):
    def check(tmp_path):
        from swd_jax.train.records import open_source
        assert len(open_source(str(tmp_path / "out"))) == n
    return check


CASES = [
    # the trainer's start-up check and data.path
    FaultCase("data_gcs_path_refused", lambda t: _train(t, "gs://my-bucket/sd35m_pre"), 2,
              r"mount the bucket with gcsfuse \(`launch/tpu_pod.sh --mount gs://my-bucket` mounts it at "
              r"/mnt/gcs/my-bucket on every worker\) and pass --config.data.path=/mnt/gcs/my-bucket/sd35m_pre, or "
              r"pass --config.data.copy_to_local=True"),
    FaultCase("data_shard_bitflip_fast_check", _train_with(_bitflip_fast), 2,
              r"precomputed-00001-of-00002.array_record record 0: unreadable \(RuntimeError: Corrupted Riegeli.*"
              + REDO),
    FaultCase("data_shard_bitflip_full_check", _train_with(_bitflip_full), 2,
              r"precomputed-00001-of-00002.array_record: checksum mismatch \(crc32c \w+, precompute recorded \w+\).*"
              + REDO),
    FaultCase("data_shard_truncated", _train_with(_truncated), 2,
              r"precomputed-00000-of-00002.array_record: \d+ bytes, precompute wrote \d+: truncated.*" + REDO),
    FaultCase("data_shard_missing", _train_with(lambda d: os.remove(_shard(d, 1))), 2,
              r"1 of 2 shards missing: \['precomputed-00001-of-00002.array_record'\]; rerun precompute"),
    FaultCase("data_sidecar_missing", _train_with(lambda d: os.remove(_shard(d, 0) + ".json")), 2,
              r"precomputed-00000-of-00002.array_record.json missing \(the shard's row count and checksum\).*" + REDO),
    FaultCase("data_shard_partial", _train_with(_partial), 2,
              r"unfinished precompute output \['precomputed-00001-of-00002.partial'\]; rerun `swd-precompute`"),
    FaultCase("data_verify_unknown_mode", _train_with(lambda d: ("--config.data.verify=quick",)), 2,
              r"data.verify='quick'; expected 'fast' .* or 'full'"),
    # precompute's input: metainfo.csv and the images
    FaultCase("metainfo_stray_quote", _csv_case('3.png,"a tower with a stray quote'), 2,
              r"metainfo.csv line 5: unexpected end of data \(an unbalanced quote\?"),
    FaultCase("metainfo_wrong_column_count", _csv_case("3.png,a tower, with an unquoted comma"), 2,
              r"metainfo.csv line 5: 3 fields, the header has 2 \('file_name', 'prompt'\)"),
    FaultCase("metainfo_empty_prompt_strict", _csv_case("3.png,", "--strict_prompts"), 2,
              r"metainfo.csv line 5: empty prompt \(for 3.png\)"),
    FaultCase("metainfo_empty_image_name", _csv_case(",a tower"), 2, r"metainfo.csv line 5: empty image file name"),
    FaultCase("metainfo_not_utf8", _not_utf8, 2, r"metainfo.csv line 14: not UTF-8 text"),
    FaultCase("precompute_image_missing", _missing_image, 2,
              r"metainfo.csv: 1 of 12 images not found in .* \(line 5: 3.png\); --skip_bad leaves them out"),
    FaultCase("precompute_image_corrupt", _corrupt_image(), 2, r"cannot decode image .*3.png"),
    FaultCase("precompute_image_corrupt_skipped", _corrupt_image("--skip_bad"), 0,
              r"metainfo.csv line 5: image 3.png missing or unreadable; skipped \(--skip_bad\)", _records_in(11)),
    FaultCase("precompute_empty_prompt_kept", _empty_prompt_kept, 0,
              r"metainfo.csv: 12 rows read from 12 data lines; 1 with an empty prompt \(line 5\)", _records_in(12)),
]
