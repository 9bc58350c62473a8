"""The README's journey, literally: its `<!-- journey -->` shell block runs in a fresh folder outside the repository.

A tiny random SD3.5-shaped pipeline and an 8-image dataset are built here; the block's commands (swd-convert,
swd-verify, swd-precompute, swd-train, swd-generate) each must exit 0 and write what the README says.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.test_prompt_encoding import _dataset, _save, sd3  # noqa: F401  (module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def complete_pipeline(root) -> None:
    """The tiny SD3 folder of the `sd3` fixture made a whole pipeline: model_index.json and a random transformer."""
    from diffusers import SD3Transformer2DModel
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    torch.manual_seed(0)
    _save(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), root / "transformer")


def journey_commands() -> list[str]:
    """The README's journey block: one command per logical line (backslash continuations joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- journey -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- journey --> bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_journey_runs_literally(sd3, tmp_path):  # noqa: F811
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel
    root = sd3[1]
    complete_pipeline(root)
    data = _dataset(tmp_path / "data", 8)
    work = tmp_path / "elsewhere"
    work.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PIPE=str(root), DATA=str(data), JAX_PLATFORMS="cpu",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SWD_COMPILE_CACHE=jax_cache_dir())
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has
    times = {}
    for cmd in journey_commands():
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        times[cmd.split()[0]] = round(time.perf_counter() - t0, 1)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if cmd.startswith("swd-verify"):
            assert proc.stdout.strip().endswith("PASS"), proc.stdout
    print("journey times (s):", times)
    assert (work / "ckpt" / "conversion.json").exists()
    assert json.loads((work / "pre" / "precompute.json").read_text())["format"] == 2
    assert (work / "run" / "checkpoints").is_dir() and (work / "run" / "metrics.jsonl").exists()
    adapter = work / "run" / "student_peft"
    assert (adapter / "pytorch_lora_weights.safetensors").exists()
    PeftModel.from_pretrained(SD3Transformer2DModel.from_pretrained(root / "transformer"), str(adapter))
    index = json.loads((work / "images" / "images.json").read_text())
    assert len(index) >= 1 and all((work / "images" / e["file"]).exists() for e in index)
    assert (work / "images" / "grid.png").exists()


def jax_cache_dir() -> str:
    import jax
    return jax.config.jax_compilation_cache_dir or ""


if __name__ == "__main__":  # print the commands the test runs
    print("\n".join(journey_commands()))
    pytest.main([__file__, "-q", "-s"])
