"""swd-precompute from and to gs:// (the emulator): shards uploaded as each completes, resumable, read back; the
trainer's gs:// data.path: refused with the mount line, or downloaded with data.copy_to_local."""
import json
import re

import numpy as np
import pytest

from swd_jax import storage
from tests.fault_table import run_cli
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from tests.test_prompt_encoding import T5_LEN, _dataset, sd3  # noqa: F401  (module-scoped fixture)


def _argv(root, data, out):
    return ["--model", str(root), "--data", str(data), "--out", str(out), "--scales", "4,8", "--shard_size", "2",
            "--dtype", "float32", "--param_dtype", "float32", "--store_dtype", "float32",
            "--max_sequence_length", str(T5_LEN)]


def _counts(err: str) -> dict:
    return json.loads([ln for ln in err.splitlines() if ln.startswith("{") and '"written"' in ln][-1])


def test_precompute_to_gcs_resumes_and_reads_back(sd3, gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
    from swd_jax.cli.precompute import main
    from swd_jax.train.records import array_record_files, decode_array_record, open_source
    from swd_jax.train.sources import check_precomputed, local_data_path
    monkeypatch.setenv("SWD_GCS_CACHE", str(tmp_path / "cache"))
    root, data = sd3[1], _dataset(tmp_path / "data", 5)
    gs_data, out = f"{gcs_bucket}/data", f"{gcs_bucket}/pre"
    storage.copy_tree(str(data), gs_data)
    rc, err = run_cli(main, _argv(root, gs_data, out))
    assert rc == 0, err
    assert re.search(r"metainfo.csv: 5 rows read from 5 data lines; 1 with an empty prompt \(line 4\)", err), err
    names = storage.listdir(out)
    shards = [n for n in names if n.endswith(".array_record")]
    assert len(shards) == 3 and not [n for n in names if "partial" in n]  # 5 rows, 2 per shard
    assert {"precompute.json", "uncond.npz", *(f"{s}.json" for s in shards)} <= set(names)
    meta = json.loads(storage.read_text(storage.join(out, "precompute.json")))
    assert meta["checksums"] and meta["command"].startswith("swd-precompute --model") and out in meta["command"]
    side = json.loads(storage.read_text(storage.join(out, shards[0] + ".json")))
    assert side["rows"] == 2 and len(side["crc32c"]) == 8 and side["bytes"] > 0
    # resume: a missing shard object is redone, the others skipped
    storage.remove(storage.join(out, shards[1]))
    rc, err = run_cli(main, _argv(root, gs_data, out))
    assert rc == 0 and _counts(err)["written"] == 2 and _counts(err)["skipped_shards"] == 2, err
    # the trainer: gs:// is refused with the mount line; copy_to_local downloads it and the full check passes
    bucket = gcs_bucket[len("gs://"):]
    with pytest.raises(ValueError, match=rf"gcsfuse \(`launch/tpu_pod.sh --mount gs://{bucket}` mounts it at "
                                         rf"/mnt/gcs/{bucket} .*--config.data.path=/mnt/gcs/{bucket}/pre"):
        local_data_path(out)
    local = local_data_path(out, copy_to_local=True)
    assert local.startswith(str(tmp_path / "cache"))
    assert check_precomputed(local, array_record_files(local), "full") == 5
    # the same records as a local precompute of the same data
    rc, err = run_cli(main, _argv(root, data, tmp_path / "local"))
    assert rc == 0, err
    a, b = open_source(local), open_source(str(tmp_path / "local"))
    for i in range(5):
        x, y = decode_array_record(a.records[i]), decode_array_record(b.records[i])
        assert x["file_name"] == y["file_name"] == f"{i}.png"
        for k in ("mean_8", "std_8", "prev_mean_8", "prompt_embeds"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)


def test_trainer_gcs_data_path_refused_or_copied(gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
    from swd_jax.train import shard_checks
    from swd_jax.train.config_loading import load_config
    from swd_jax.train.records import write_array_records
    from swd_jax.train.sources import make_source
    monkeypatch.setenv("SWD_GCS_CACHE", str(tmp_path / "cache"))
    c = load_config("tiny")
    c.data.kind, c.data.path = "precomputed", f"{gcs_bucket}/pre"
    assert c.data.copy_to_local is False and c.data.verify == "fast"
    with pytest.raises(ValueError, match=r"cannot be read from gs:// directly; mount the bucket with gcsfuse"):
        make_source(c, None, None)
    write_array_records(str(tmp_path / "x.array_record"), [{"x": np.zeros(3, np.float32)}])
    storage.copy_file(str(tmp_path / "x.array_record"), f"{gcs_bucket}/pre/x.array_record")
    monkeypatch.setattr(shard_checks.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(ValueError, match=r"does not fit .*10 % margin kept\); mount the bucket with gcsfuse"):
        shard_checks.local_data_path(c.data.path, copy_to_local=True)
    monkeypatch.undo()
    monkeypatch.setenv("SWD_GCS_CACHE", str(tmp_path / "cache"))
    local = shard_checks.local_data_path(c.data.path, copy_to_local=True)
    assert (tmp_path / "cache").exists() and local.endswith("/pre")
    assert open(f"{local}/x.array_record", "rb").read() == (tmp_path / "x.array_record").read_bytes()
