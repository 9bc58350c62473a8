"""Fault rows of the tools: swd-convert, swd-verify, swd-generate, swd-evaluate (collected by tests/test_faults.py;
the contract is tests/fault_table.py).

Rows refused before any model loads pass folders that hold nothing a model needs; the others share one tiny
random SD3 transformer folder (torch, built once per session) or one tiny CLIP folder. Rows on `gs://` use a
fresh bucket of the emulator of tests/gcs_emulator.py.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from tests.fault_table import FaultCase, run_cli

WEIGHTS = "diffusion_pytorch_model.safetensors"


@functools.lru_cache(maxsize=None)
def _tiny_transformer() -> str:
    """A diffusers SD3 transformer folder (2 blocks, random weights), once per session."""
    from tests.torch_reference import tiny_sd3_transformer
    d = os.path.join(tempfile.mkdtemp(prefix="swd_fault_tools_"), "transformer")
    tiny_sd3_transformer("sd35_medium", num_layers=2).save_pretrained(d)
    return d


@functools.lru_cache(maxsize=None)
def _tiny_clip() -> str:
    from tests.test_evaluate import _clip_folder
    d = pathlib.Path(tempfile.mkdtemp(prefix="swd_fault_clip_")) / "clip"
    d.mkdir()
    _clip_folder(d, 0)
    return str(d)


def _bucket() -> str:
    """A fresh emulator bucket; the emulator is stopped at exit if this module started it."""
    from tests import gcs_emulator
    started = gcs_emulator._server[0] is None
    url = gcs_emulator.new_bucket()
    if started:
        atexit.register(lambda: gcs_emulator._server[0] is not None and gcs_emulator._server[0].stop())
    return url


def _truncated(tmp_path: pathlib.Path) -> str:
    d = tmp_path / "truncated"
    shutil.copytree(_tiny_transformer(), d)
    f = d / WEIGHTS
    f.write_bytes(f.read_bytes()[:-1000])
    return str(d)


def _images(tmp_path: pathlib.Path, n: int = 2) -> str:
    from PIL import Image

    from swd_jax.eval.prompts import write_index
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    write_index(str(d), [{"file": f"{i:05d}.png", "prompt": "a red cat"} for i in range(n)])
    return str(d)


# ----------------------------------------------------------------------------------------------------------------
# the commands, run in this process
# ----------------------------------------------------------------------------------------------------------------
def convert(*argv) -> tuple[int, str]:
    from swd_jax.cli.convert import main
    return run_cli(main, [*map(str, argv), "--no-progress"])


def verify(*argv) -> tuple[int, str]:
    from swd_jax.cli.verify import main
    return run_cli(main, [*map(str, argv), "--sizes", "8", "--batch", "1", "--text-tokens", "7"])


def generate(*argv) -> tuple[int, str]:
    from swd_jax.cli.generate import main
    return run_cli(main, [*map(str, argv), "--no-progress"])


def evaluate(*argv) -> tuple[int, str]:
    from swd_jax.cli.evaluate import main
    return run_cli(main, list(map(str, argv)))


def _convert_into_converted(t: pathlib.Path) -> tuple[int, str]:
    rc, err = convert(_tiny_transformer(), t / "ckpt")
    assert rc == 0, err
    return convert(_tiny_transformer(), t / "ckpt")


def _not_empty(t: pathlib.Path) -> tuple[int, str]:
    (t / "out").mkdir()
    (t / "out" / "notes.txt").write_text("mine")
    return convert(_tiny_transformer(), t / "out")


def _lora_without_adapter(t: pathlib.Path) -> tuple[int, str]:
    (t / "lora").mkdir()
    (t / "lora" / "readme.txt").write_text("no adapter here")
    return generate("--model", t, "--lora", t / "lora", "--prompt", "x", "--out", t / "out")


def _evaluate_ok(t: pathlib.Path) -> tuple[int, str]:
    return evaluate("--images", _images(t), "--clip", _tiny_clip(), "--clip-batch-size", "2")


def _metrics_written(t: pathlib.Path) -> None:
    metrics = json.loads((t / "images" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and np.isfinite(metrics["clip_score"])


def _untouched(t: pathlib.Path) -> None:
    assert os.listdir(t / "out") == ["notes.txt"], os.listdir(t / "out")


def _no_output(folder: str):
    def check(t: pathlib.Path) -> None:
        assert not (t / folder).exists() or not any((t / folder).iterdir()), sorted((t / folder).iterdir())
    return check


CASES = [
    FaultCase("convert-truncated-safetensors", lambda t: convert(_truncated(t), t / "out"), 2,
              rf"{WEIGHTS} is truncated: tensor '[^']+' ends at byte \d+ but the file has \d+ bytes",
              _no_output("out")),
    FaultCase("verify-truncated-safetensors", lambda t: verify(_truncated(t)), 2,
              rf"could not run the comparison: ValueError: .*{WEIGHTS} is truncated: tensor '[^']+'"),
    FaultCase("convert-not-a-diffusers-folder", lambda t: convert(t, t / "out"), 2,
              r"is neither a diffusers transformer folder .* nor a pipeline folder", _no_output("out")),
    FaultCase("convert-missing-source", lambda t: convert(t / "nothing", t / "out"), 2,
              r"nothing: no such folder, and not a Hub id",
              _no_output("out")),
    FaultCase("convert-into-converted-checkpoint", _convert_into_converted, 2,
              r"already holds converted params; pass --overwrite to replace them"),
    FaultCase("convert-into-non-empty-folder", _not_empty, 2, r"out is not empty \(holds notes.txt\); give a new or "
              r"empty folder", _untouched),
    FaultCase("convert-gs-without-bucket", lambda t: convert(_tiny_transformer(), "gs://"), 2,
              r"gs:// path needs a bucket"),
    FaultCase("generate-batch-0", lambda t: generate("--model", t, "--prompt", "x", "--out", t / "out", "--batch", 0),
              2, r"--batch must be a positive integer, got 0", _no_output("out")),
    FaultCase("generate-num-per-prompt-0", lambda t: generate("--model", t, "--prompt", "x", "--out", t / "out",
                                                              "--num-per-prompt", 0),
              2, r"--num-per-prompt must be a positive integer, got 0"),
    FaultCase("generate-missing-lora", lambda t: generate("--model", t, "--lora", t / "run", "--prompt", "x",
                                                          "--out", t / "out"),
              2, r"no LoRA adapter or run workdir at .*/run$", _no_output("out")),
    FaultCase("generate-missing-lora-gs", lambda t: generate("--model", t, "--lora", _bucket() + "/run", "--prompt",
                                                             "x", "--out", t / "out"),
              2, r"no LoRA adapter or run workdir at gs://swd-[0-9a-f]+/run"),
    FaultCase("generate-lora-without-adapter", _lora_without_adapter, 2,
              r"lora: neither a PEFT adapter \(adapter_config.json \+ adapter_model.safetensors\) nor a diffusers LoRA"
              r" \(pytorch_lora_weights.safetensors\); found \['readme.txt'\]"),
    FaultCase("generate-out-is-a-file", lambda t: (t / "f").write_text("") or generate(
        "--model", t, "--prompt", "x", "--out", t / "f"), 2, r"--out .*/f is a file, not a folder"),
    FaultCase("generate-out-gs-without-bucket", lambda t: generate("--model", t, "--prompt", "x", "--out", "gs://"),
              2, r"gs:// path needs a bucket"),
    FaultCase("generate-missing-prompt-file", lambda t: generate("--model", t, "--prompts", t / "p.csv",
                                                                 "--out", t / "out"),
              2, r"prompt file .*p.csv does not exist"),
    FaultCase("evaluate-empty-image-folder", lambda t: (t / "images").mkdir() or evaluate(
        "--images", t / "images", "--clip", t), 2,
              r"images has no images.json \(swd-generate writes it\) and no images"),
    FaultCase("evaluate-images-without-index", lambda t: (os.remove(os.path.join(_images(t), "images.json")), evaluate(
        "--images", t / "images", "--clip", t))[1], 2, r"to pair its 2 images with prompts give --prompts FILE.csv"),
    FaultCase("evaluate-no-metric", lambda t: evaluate("--images", _images(t)), 2, r"no metric to compute"),
    FaultCase("evaluate-limit-0", lambda t: evaluate("--images", _images(t), "--clip", t, "--limit", 0), 2,
              r"--limit must be a positive integer, got 0"),
    FaultCase("evaluate-missing-clip-gs", lambda t: evaluate("--images", _images(t), "--clip", _bucket() + "/clip"),
              2, r"CLIP model folder gs://swd-[0-9a-f]+/clip not found"),
    FaultCase("evaluate-succeeds-exit-0", _evaluate_ok, 0, r"evaluating", _metrics_written),
]
