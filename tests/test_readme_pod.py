"""The README's pod block, literally, against a local Cloud Storage emulator: convert, precompute, train and
generate with every output (and the training data's source) on `gs://`, run from a folder outside the repository."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from swd_jax import storage
from tests.gcs_emulator import emulator_env, gcs_bucket, gcs_emulator  # noqa: F401
from tests.test_prompt_encoding import _dataset, sd3  # noqa: F401  (module-scoped fixture)
from tests.test_readme_journey import ROOT, complete_pipeline, jax_cache_dir


def pod_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- pod -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- pod --> bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_pod_block_runs_literally_on_gcs(sd3, gcs_bucket, tmp_path):  # noqa: F811
    root = sd3[1]
    complete_pipeline(root)
    data = _dataset(tmp_path / "data", 8)
    work = tmp_path / "elsewhere"
    work.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PIPE=str(root), DATA=str(data), BUCKET=gcs_bucket, JAX_PLATFORMS="cpu",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               SWD_COMPILE_CACHE=jax_cache_dir(), SWD_GCS_CACHE=str(tmp_path / "gcs_cache"))
    env.update(emulator_env())  # the emulator's variables; PYTHONPATH with this repository first
    env.pop("XLA_FLAGS", None)
    times = {}
    for cmd in pod_commands():
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        times[cmd.split()[0]] = round(time.perf_counter() - t0, 1)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    print("pod block times (s):", times)
    assert os.listdir(work) == []  # nothing local: everything went to the bucket
    b = gcs_bucket
    assert storage.exists(f"{b}/ckpt/conversion.json") and storage.exists(f"{b}/pre/precompute.json")
    for name in ("config.json", "metrics.jsonl", "student_peft/pytorch_lora_weights.safetensors"):
        assert storage.exists(f"{b}/run/{name}"), name
    assert storage.listdir(f"{b}/run/checkpoints") and storage.listdir(f"{b}/run/tb")
    index = json.loads(storage.read_text(f"{b}/images/images.json"))
    assert len(index) >= 1 and all(storage.exists(f"{b}/images/{e['file']}") for e in index)


if __name__ == "__main__":
    print("\n".join(pod_commands()))
    pytest.main([__file__, "-q", "-s"])
