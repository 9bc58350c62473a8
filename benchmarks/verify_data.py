"""How long the trainer's start-up check of precomputed data takes: `data.verify=fast` vs `full`.

    python benchmarks/verify_data.py --records 10000 --shard_size 512

Builds a precompute-shaped folder of random records (bf16 posterior moments [16, 16, 16] at 4 scales, with
the previous scale's, + [77, 32] text embeddings and a pooled vector; precompute's sidecars with CRC32C) in a
temporary folder, then times `shard_checks.check_precomputed` in both modes (the second of two runs: the
page cache warm, as on a re-start; the first run's time is printed too). Prints one line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swd_jax.train.precompute import shard_name, shard_ranges  # noqa: E402
from swd_jax.train.records import ArrayRecordsWriter  # noqa: E402
from swd_jax.train.shard_checks import check_precomputed, shard_sidecar  # noqa: E402


def build(folder: str, n: int, shard_size: int, scales=(10, 12, 14, 16), channels: int = 16) -> list[str]:
    """A precompute-shaped folder of `n` random records; returns its shard files."""
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16

    def arr(*shape):
        return rng.standard_normal(shape, np.float32).astype(bf16)

    ranges = shard_ranges(n, shard_size)
    files = []
    for i, (a, b) in enumerate(ranges):
        f = os.path.join(folder, shard_name(i, len(ranges)))
        with ArrayRecordsWriter(f) as w:
            for r in range(a, b):
                rec = {"prompt_embeds": arr(77, 32), "pooled_prompt_embeds": arr(64), "prompt": f"prompt {r}",
                       "file_name": f"{r}.png"}
                for k, s in enumerate(scales):
                    rec[f"mean_{s}"], rec[f"std_{s}"] = arr(16, 16, channels), arr(16, 16, channels)
                    if k:
                        rec[f"prev_mean_{s}"], rec[f"prev_std_{s}"] = arr(16, 16, channels), arr(16, 16, channels)
                w.write(rec)
        with open(f + ".json", "w") as s_:
            json.dump(shard_sidecar(f, b - a, 0), s_)
        files.append(f)
    with open(os.path.join(folder, "precompute.json"), "w") as f:
        json.dump({"format": 2, "n_rows": n, "shard_size": shard_size, "checksums": True}, f)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=10000)
    p.add_argument("--shard_size", type=int, default=512)
    p.add_argument("--dir", help="where to build the data (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.dir or tmp
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        files = build(folder, a.records, a.shard_size)
        size = sum(os.path.getsize(f) for f in files)
        print(f"built {a.records} records in {len(files)} shards, {size / 1e6:.0f} MB, in "
              f"{time.perf_counter() - t0:.1f} s")
        for mode in ("fast", "full"):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                assert check_precomputed(folder, files, mode) == a.records
                times.append(time.perf_counter() - t0)
            print(f"verify={mode}: {times[1]:.3f} s ({size / 1e6 / times[1]:.0f} MB/s; first run {times[0]:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
