"""`swd-precompute --distributed` as 2 processes over one dataset, writing to gs:// (the emulator): disjoint
shards whose union is the dataset, each record equal to a local 1-process precompute's."""
import os
import socket
import subprocess
import sys

import numpy as np

from swd_jax import storage
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from tests.test_prompt_encoding import T5_LEN, _dataset, sd3  # noqa: F401  (module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multihost_precompute_shards_are_disjoint_and_complete(sd3, gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
    import jax

    from swd_jax.train.precompute import precompute
    from swd_jax.train.records import decode_array_record, open_source
    root, data = str(sd3[1]), _dataset(tmp_path / "data", 7)
    args = ["--model", root, "--data", str(data), "--scales", "4,8", "--shard_size", "2", "--dtype", "float32",
            "--param_dtype", "float32", "--store_dtype", "float32", "--max_sequence_length", str(T5_LEN)]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SWD_COMPILE_CACHE="off",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    monkeypatch.setenv("SWD_GCS_CACHE", str(tmp_path / "cache"))
    out = f"{gcs_bucket}/two"
    procs = [subprocess.Popen([sys.executable, "-m", "swd_jax.cli.precompute", *args, "--out", str(out), "--distributed",
                               "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    one = tmp_path / "one"
    precompute(root, str(data), str(one), (4, 8), shard_size=2, dtype="float32", param_dtype="float32",
               store_dtype="float32", devices=jax.devices()[:1], progress=False, max_sequence_length=T5_LEN)
    names = storage.listdir(out)
    shards = [n for n in names if n.endswith(".array_record")]
    assert shards == sorted(p.name for p in one.glob("*.array_record")) and len(shards) == 4  # 7 rows, 2 per shard
    assert not [n for n in names if "partial" in n] and all(f"{n}.json" in names for n in shards)
    two_src, one_src = open_source(storage.local_copy(out)), open_source(str(one))
    two = [decode_array_record(two_src.records[i]) for i in range(len(two_src.records))]
    ref = [decode_array_record(one_src.records[i]) for i in range(len(one_src.records))]
    assert [r["file_name"] for r in two] == [f"{i}.png" for i in range(7)]  # each row once, in order
    for a, b in zip(two, ref, strict=True):
        for k in ("mean_8", "std_8", "prev_mean_8", "prompt_embeds"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
