"""Data pipeline: metainfo.csv -> tfds array_record -> grain loader (shards, shuffle, resume, corrupt images)."""
import csv
import io
import os

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from swd_jax.train import records as data

N_GOOD = 12
BAD = ("bad_garbage.png", "bad_truncated.png")


def _color(i):
    return (20 * i, 255 - 20 * i, 7)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """12 solid-colour PNGs (one non-square), 2 unreadable ones, and a csv row naming a missing file."""
    d = tmp_path_factory.mktemp("swd_images_src")
    rows = []
    for i in range(N_GOOD):
        size = (24, 16) if i == 0 else (16, 16)
        Image.new("RGB", size, _color(i)).save(d / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", f"prompt number {i}, with a comma"))
    (d / BAD[0]).write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / BAD[1]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rows += [(BAD[0], "bad 0"), (BAD[1], "bad 1"), ("missing.png", "gone")]
    with open(d / "metainfo.csv", "w", newline="") as f:  # the reference layout: unnamed index column first
        w = csv.writer(f)
        w.writerow(["", "file_name", "caption"])
        for k, (name, prompt) in enumerate(rows):
            w.writerow([k, name, prompt])
    return str(d)


@pytest.fixture(scope="module")
def image_ds(image_dir, tmp_path_factory):
    return data.build_image_dataset(image_dir, str(tmp_path_factory.mktemp("swd_images_out")))


@pytest.fixture(scope="module")
def array_files(tmp_path_factory):
    """13 records of precomputed arrays, split over two array_record files."""
    d = tmp_path_factory.mktemp("arrays")
    recs = [{"x": np.full((3,), i, np.float32), "id": np.int32(i), "prompt": f"p{i}"} for i in range(13)]
    assert data.write_array_records(str(d / "a.array_record"), recs[:7]) == 7
    assert data.write_array_records(str(d / "b.array_record"), recs[7:]) == 6
    return str(d)


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_build_and_load_shapes_dtypes_values(image_ds):
    src = data.open_source(image_ds)
    assert src.kind == "images" and len(src) == N_GOOD + len(BAD)  # the missing file is left out
    (b,) = _take(data.make_loader(image_ds, 4, seed=0, shard_index=0, shard_count=1, resolution=8), 1)
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8
    assert b["record_index"].shape == (4,) and b["record_index"].dtype == np.int64
    assert isinstance(b["prompt"], list) and all(isinstance(p, str) for p in b["prompt"])
    for img, name, prompt in zip(b["image"], b["file_name"], b["prompt"]):
        i = int(name[:3])
        np.testing.assert_array_equal(img, np.broadcast_to(np.array(_color(i), np.uint8), (8, 8, 3)))
        assert prompt == f"prompt number {i}, with a comma"
    (f,) = _take(data.make_loader(image_ds, 4, seed=0, shard_index=0, shard_count=1, resolution=8,
                                  image_dtype="float32"), 1)
    assert f["image"].dtype == np.float32
    np.testing.assert_allclose(f["image"], b["image"].astype(np.float32) / 127.5 - 1.0, rtol=0, atol=1e-7)
    # resolution=None keeps native sizes; the non-square one cannot be stacked with the rest -> clear error
    with pytest.raises(ValueError, match="cannot batch 'image'"):
        _take(data.make_loader(image_ds, N_GOOD + 2, seed=0, shard_index=0, shard_count=1, shuffle=False), 1)


def test_corrupt_images_skipped_and_counted(image_ds):
    src = data.open_source(image_ds)
    bad_idx = {i for i in range(len(src)) if src.records[i]["file_name"].decode() in BAD}
    assert len(bad_idx) == 2
    loader = data.make_loader(image_ds, 7, seed=1, shard_index=0, shard_count=1, resolution=8)
    batches = _take(loader, 6)  # 42 slots = 3 epochs: each bad record comes up (at least) 3 times
    seen = np.concatenate([b["record_index"] for b in batches])
    assert not bad_idx & set(seen.tolist())
    assert loader.num_skipped >= 6
    assert loader.state() == {"position": 6, "num_skipped": loader.num_skipped}


def test_shards_disjoint_and_covering(array_files):
    n, hosts = 13, 2
    streams = [np.concatenate([b["record_index"] for b in _take(
        data.make_loader(array_files, 1, seed=5, shard_index=h, shard_count=hosts), n)]) for h in range(hosts)]
    glob_stream = np.empty(n * hosts, np.int64)  # host h holds global slots h, h + hosts, ...
    for h in range(hosts):
        glob_stream[h::hosts] = streams[h]
    epoch0, epoch1 = glob_stream[:n], glob_stream[n:]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))  # disjoint + covering
    assert list(epoch0) != list(epoch1)  # reshuffled each epoch
    assert not set(streams[0][:7]) & set(streams[1][:6])


def test_array_records_batches_and_shuffle_determinism(array_files):
    def run(seed, shuffle=True):
        return _take(data.make_loader(array_files, 4, seed=seed, shard_index=0, shard_count=1, shuffle=shuffle), 3)

    a, b, c = run(7), run(7), run(8)
    assert a[0]["x"].shape == (4, 3) and a[0]["x"].dtype == np.float32 and a[0]["id"].dtype == np.int32
    np.testing.assert_array_equal(a[0]["x"][:, 0], a[0]["id"].astype(np.float32))
    assert a[0]["prompt"] == [f"p{i}" for i in a[0]["id"]]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["id"], y["id"])
    assert any((x["id"] != z["id"]).any() for x, z in zip(a, c))
    plain = run(0, shuffle=False)
    assert np.concatenate([p["id"] for p in plain]).tolist() == [*range(12)]


def test_resume_gives_the_same_batches(image_ds):
    kw = dict(seed=3, shard_index=1, shard_count=2, resolution=8)
    full = _take(data.make_loader(image_ds, 3, **kw), 7)
    resumed_loader = data.make_loader(image_ds, 3, start_position=4, **kw)
    assert resumed_loader.position == 4
    resumed = _take(resumed_loader, 3)
    assert resumed_loader.position == 7
    for x, y in zip(full[4:], resumed):
        assert x["file_name"] == y["file_name"] and x["prompt"] == y["prompt"]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["record_index"], y["record_index"])


def test_missing_column_clear_error(tmp_path):
    (tmp_path / "metainfo.csv").write_text("name,description\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"no image file column.*\['name', 'description'\]"):
        data.read_metainfo(str(tmp_path / "metainfo.csv"))
    (tmp_path / "metainfo.csv").write_text("image_path,description\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"no prompt column.*\['image_path', 'description'\]"):
        data.read_metainfo(str(tmp_path / "metainfo.csv"))
    (tmp_path / "metainfo.csv").write_text("image_path,prompt\na.png,a cat\n")
    assert data.read_metainfo(str(tmp_path / "metainfo.csv")) == [("a.png", "a cat")]


def test_array_record_codec_roundtrip():
    rec = {"prompt_embeds": np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(ml_dtypes.bfloat16),
           "pooled": np.linspace(-1, 1, 5), "latents_64": np.ones((2, 2, 16), np.float16), "n": np.int64(3),
           "prompt": "a cat", "raw": b"\x00\xffbytes"}
    out = data.decode_array_record(data.encode_array_record(rec))
    assert out.keys() == rec.keys() and out["prompt"] == "a cat" and out["raw"] == rec["raw"]
    for k in ("prompt_embeds", "pooled", "latents_64", "n"):
        assert out[k].dtype == np.asarray(rec[k]).dtype and out[k].shape == np.shape(rec[k])
        np.testing.assert_array_equal(out[k], rec[k])
    with pytest.raises(ValueError, match="unsupported dtype"):
        data.encode_array_record({"s": np.array(["a", "b"])})
    with pytest.raises(ValueError, match="not an swd_arrays"):
        data.decode_array_record(b"\x93\x01\x02\x03")


def test_bad_arguments(array_files):
    with pytest.raises(ValueError, match="shard_index 2 not in"):
        data.make_loader(array_files, 2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(FileNotFoundError, match="no tfds dataset"):
        data.make_loader(os.path.join(array_files, "nope"), 2, seed=0, shard_index=0, shard_count=1)


def test_worker_processes_give_the_same_batches(image_ds):
    kw = dict(seed=4, shard_index=0, shard_count=1, resolution=8, start_position=1)
    threads = data.make_loader(image_ds, 5, **kw)
    procs = data.make_loader(image_ds, 5, worker_count=2, **kw)
    a, b = _take(threads, 4), _take(procs, 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["file_name"] == y["file_name"]
    assert threads.num_skipped == procs.num_skipped > 0


def test_array_records_with_encoded_images(tmp_path):
    """Precomputed prompt embeddings next to encoded images: the loader decodes "image" bytes."""
    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), _color(i)).save(buf, "PNG")
        return buf.getvalue()

    recs = [{"image": png(i), "prompt_embeds": np.full((2, 4), i, ml_dtypes.bfloat16), "prompt": f"p{i}"}
            for i in range(5)] + [{"image": b"broken", "prompt_embeds": np.zeros((2, 4), ml_dtypes.bfloat16),
                                   "prompt": "bad"}]
    data.write_array_records(str(tmp_path / "x.array_record"), recs)
    loader = data.make_loader(str(tmp_path), 6, seed=0, shard_index=0, shard_count=1, resolution=4)
    (b,) = _take(loader, 1)
    assert b["image"].shape == (6, 4, 4, 3) and b["prompt_embeds"].shape == (6, 2, 4)
    assert b["prompt_embeds"].dtype == ml_dtypes.bfloat16 and "bad" not in b["prompt"] and loader.num_skipped >= 1
    for img, emb in zip(b["image"], b["prompt_embeds"]):
        np.testing.assert_array_equal(img[0, 0], _color(int(emb[0, 0])))


def test_metainfo_is_read_strictly(tmp_path):
    """A stray quote, a wrong field count, an empty name are refused with the line; empty prompts are counted."""
    from swd_jax.train.metainfo import describe
    good = ["file_name,prompt", *(f"{i}.png,tower {i}" for i in range(12))]

    def read(lines, **kw):
        (tmp_path / "metainfo.csv").write_text("\n".join(lines) + "\n")
        return data.read_metainfo(str(tmp_path / "metainfo.csv"), **kw)

    rows = read(good[:3] + [""] + good[3:])  # a blank line is skipped
    assert len(rows) == 12 and rows.lines == 12 and rows.line_of[3] == 6
    for bad, says in (('3.png,"a tower with a stray quote', r"line 5: unexpected end of data \(an unbalanced quote"),
                      ("3.png,a, b", r"line 5: 3 fields, the header has 2"),
                      (',"x"', r"line 5: empty image file name"),
                      ('3.png,"a" b', r"line 5: ',' expected after")):
        with pytest.raises(ValueError, match=says):
            read(good[:4] + [bad] + good[5:])
    with pytest.raises(ValueError, match=r"line 13: a quoted field runs over lines 13-14"):
        read(good[:12] + ['11.png,"two', 'lines"'])
    rows = read(good[:4] + ["3.png,"] + good[5:])
    assert rows[3] == ("3.png", "") and rows.empty_prompts == (5,)
    assert describe(rows, "m.csv") == "m.csv: 12 rows read from 12 data lines; 1 with an empty prompt (line 5), " \
                                      "trained with the empty prompt"
    with pytest.raises(ValueError, match=r"line 5: empty prompt \(for 3.png\)"):
        read(good[:4] + ["3.png,"] + good[5:], allow_empty_prompts=False)


def test_bit_flipped_shard_stops_the_loader_naming_shard_and_record(tmp_path):
    """Start-up: fast check (sampled records) and full check (CRC32C); mid-run: CorruptShard, not a skip."""
    import json

    from swd_jax.train.shard_checks import CorruptShard, check_precomputed, shard_sidecar
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        f = str(tmp_path / f"precomputed-{i:05d}-of-00002.array_record")
        data.write_array_records(f, [{"x": rng.standard_normal(256).astype(np.float32)} for _ in range(8)])
        (tmp_path / f"{os.path.basename(f)}.json").write_text(json.dumps(shard_sidecar(f, 8, 0)))
        files.append(f)
    (tmp_path / "precompute.json").write_text(json.dumps({"n_rows": 16, "shard_size": 8, "checksums": True,
                                                         "command": "swd-precompute --out X"}))
    assert check_precomputed(str(tmp_path), files, "fast") == check_precomputed(str(tmp_path), files, "full") == 16
    raw = bytearray(open(files[1], "rb").read())
    bad = None
    for off in range(64, len(raw), 61):  # a flip that breaks a record the fast check does not sample
        b = bytearray(raw)
        b[off] ^= 0x10
        open(files[1], "wb").write(bytes(b))
        src = data.open_source(files[1:])
        broken = []
        for j in range(8):
            try:
                src.records[j]
            except RuntimeError:
                broken.append(j)
        if broken and broken[0] not in (0, 4, 7):
            bad = broken[0]
            break
    assert bad is not None
    assert check_precomputed(str(tmp_path), files, "fast") == 16  # sampled records 0, 4, 7 are intact
    with pytest.raises(CorruptShard, match=r"precomputed-00001-of-00002.array_record: checksum mismatch"):
        check_precomputed(str(tmp_path), files, "full")
    loader = data.make_loader(files, 16, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(CorruptShard, match=rf"precomputed-00001-of-00002.array_record record {bad}: unreadable "
                                           r"\(RuntimeError: Corrupted Riegeli.*rerun `swd-precompute --out X`"):
        next(loader)
    loader.close()
