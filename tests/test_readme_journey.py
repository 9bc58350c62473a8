"""The README's journey, literally: its `<!-- journey -->` shell block runs in a fresh folder outside the repository.

The block starts with `swd-tiny-kit kit` (a tiny random SD3.5-shaped pipeline, 8 images, tiny FID/CLIP/PickScore
models) and walks swd-convert, swd-verify, swd-precompute, swd-train, swd-generate and swd-evaluate on them; each
command must exit 0 and write what the README says. An `export` line carries to the lines after it, as in a shell.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from swd_jax.demo.tiny_kit import complete_pipeline  # noqa: F401  (other tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def journey_commands() -> list[str]:
    """The README's journey block: one command per logical line (backslash continuations joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- journey -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- journey --> bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_journey_runs_literally(tmp_path):
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel
    commands = journey_commands()
    assert commands[0].startswith("swd-tiny-kit ") and commands[-1].startswith("swd-evaluate "), commands
    work = tmp_path / "elsewhere"
    work.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), SWD_COMPILE_CACHE=jax_cache_dir(),
               XLA_FLAGS="--xla_backend_optimization_level=0")  # one CPU device, as a user's shell has; fast compiles
    for name in ("PIPE", "DATA"):  # the block sets them
        env.pop(name, None)
    exports, times = [], {}
    for cmd in commands:
        if cmd.startswith("export "):
            exports.append(cmd)
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", "\n".join(exports + [cmd])], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
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
    PeftModel.from_pretrained(SD3Transformer2DModel.from_pretrained(work / "kit" / "pipeline" / "transformer"),
                              str(adapter))
    index = json.loads((work / "images" / "images.json").read_text())
    assert len(index) >= 1 and all((work / "images" / e["file"]).exists() for e in index)
    assert (work / "images" / "grid.png").exists()
    metrics = json.loads((work / "images" / "metrics.json").read_text())
    assert metrics["num_images"] == len(index) and {"fid", "clip_score", "pickscore"} <= set(metrics), metrics


def test_tiny_kit_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    from swd_jax.cli import tiny_kit
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a kit")
    assert tiny_kit.main([str(tmp_path / "mine")]) == 2
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the torch extra
    assert tiny_kit.main([str(tmp_path / "kit")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is not empty" in err[0] and err[1].startswith("error: ") and "requirements-torch.txt" in err[1], err
    assert not (tmp_path / "kit").exists()


def jax_cache_dir() -> str:
    import jax
    return jax.config.jax_compilation_cache_dir or ""


if __name__ == "__main__":  # print the commands the test runs
    print("\n".join(journey_commands()))
    pytest.main([__file__, "-q", "-s"])
