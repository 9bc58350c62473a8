"""The commands on Cloud Storage (the emulator of tests/gcs_emulator.py): swd-convert to and from gs://, a converted
checkpoint loaded and verified from gs://, swd-generate with --model/--lora/--out on gs://, swd-evaluate of images
on gs:// with a metric model on gs://. Tiny random SD3 models, as tests/test_generate.py builds them."""
import json
import os

import jax
import numpy as np
import pytest

from swd_jax import storage
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from tests.test_prompt_encoding import T5_LEN, sd3  # noqa: F401  (module-scoped fixture)
from tests.test_readme_journey import complete_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")
JUNK = "sd3.5_tiny.safetensors"  # a hub snapshot's top-level single-file checkpoint: never downloaded


@pytest.fixture(scope="module", autouse=True)
def gcs_cache(tmp_path_factory):
    """Downloads of this module go to a fresh cache folder."""
    old = os.environ.get("SWD_GCS_CACHE")
    os.environ["SWD_GCS_CACHE"] = str(tmp_path_factory.mktemp("gcs_cache"))
    yield os.environ["SWD_GCS_CACHE"]
    if old is None:
        os.environ.pop("SWD_GCS_CACHE")
    else:
        os.environ["SWD_GCS_CACHE"] = old


@pytest.fixture(scope="module")
def pipe(sd3):  # noqa: F811
    """A tiny SD3 pipeline folder: text encoders, tokenizers, VAE, transformer, model_index.json, a junk file."""
    root = sd3[1]
    complete_pipeline(root)
    (root / JUNK).write_bytes(b"\0" * 1024)
    return root


def _cached_names(cache) -> set[str]:
    return {f for _, _, files in os.walk(cache) for f in files}


def test_convert_load_and_verify_on_gcs(pipe, gcs_bucket, gcs_cache):
    from swd_jax.cli.convert import main as convert_main
    from swd_jax.convert.converted import conversion_source, load_converted, model_kind
    from swd_jax.convert.converted import load_diffusers
    from swd_jax.train.setup import _read_model_config, model_source
    from swd_jax.cli.verify import main as verify_main
    src, ckpt = f"{gcs_bucket}/pipe", f"{gcs_bucket}/ckpt"
    storage.copy_tree(str(pipe), src)
    assert convert_main([src, ckpt, "--no-progress"]) == 0
    assert sorted(storage.listdir(ckpt)) == ["config.json", "conversion.json", "params"]
    assert conversion_source(ckpt) == f"{src}/transformer"
    assert JUNK not in _cached_names(gcs_cache)  # of the pipeline only transformer/ came down
    assert [model_kind(p) for p in (ckpt, src, f"{src}/transformer")] == ["converted", "pipeline", "transformer"]
    assert model_source("auto", ckpt) == "converted" and model_source("auto", src) == "diffusers"

    cfg, params = load_converted(ckpt)  # orbax straight from gs://
    want_cfg, want = load_diffusers(str(pipe / "transformer"))
    assert cfg == want_cfg == _read_model_config("converted", ckpt) == _read_model_config("diffusers", src)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert convert_main([src, ckpt, "--no-progress"]) == 2  # holds params, no --overwrite
    # the checkpoint training reads, from gs://, against the diffusers source its conversion.json names (gs://)
    assert verify_main([ckpt, "--sizes", "8", "--batch", "1", "--text-tokens", "7"]) == 0


def _run_with_student_peft(folder, cfg_folder):
    """A training workdir holding config.json and student_peft/ (no checkpoints), as an exported run leaves it."""
    from configs import tiny
    from swd_jax.convert.peft_lora import export_diffusers_lora, export_peft, init_lora
    from swd_jax.models.layers import LoraConfig
    from swd_jax.models.mmdit import MMDiTConfig
    cfg = MMDiTConfig.from_folder(str(cfg_folder))
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    factors = init_lora(cfg, lora, jax.random.key(0))
    factors = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "lora_B" in str(p[-1]) else x,
        factors)
    export_peft(factors, lora, str(folder / "student_peft"), cfg=cfg)
    export_diffusers_lora(factors, lora, str(folder / "student_peft"), cfg=cfg)
    c = tiny.get_config()
    c.schedule.scales, c.schedule.boundaries = (4, 8), (0, 14, 28)
    c.lora.rank, c.lora.alpha, c.lora.targets = lora.rank, lora.alpha, lora.targets
    (folder / "config.json").write_text(c.to_json_best_effort(indent=2))
    return folder


def test_generate_and_evaluate_on_gcs(pipe, gcs_bucket, gcs_cache, tmp_path, capsys):
    from PIL import Image

    from swd_jax.cli import evaluate
    from swd_jax.cli.generate import main as generate_main
    from tests.test_evaluate import _clip_folder
    model, run, out = f"{gcs_bucket}/pipe", f"{gcs_bucket}/run", f"{gcs_bucket}/images"
    storage.copy_tree(str(pipe), model)
    storage.copy_tree(str(_run_with_student_peft(tmp_path / "run", pipe / "transformer")), run)
    storage.write_text(f"{gcs_bucket}/prompts.txt", "a red tower\n\nthe low tower\n")
    rc = generate_main(["--model", model, "--lora", run, "--out", out, "--prompts", f"{gcs_bucket}/prompts.txt",
                        "--batch", "2", "--max-sequence-length", str(T5_LEN), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert JUNK not in _cached_names(gcs_cache)
    assert storage.listdir(out) == ["00000.png", "00001.png", "grid.png", "images.json"]
    records = json.loads(storage.read_text(f"{out}/images.json"))
    assert [r["prompt"] for r in records] == ["a red tower", "the low tower"]
    assert records[0]["lora"] == f"{run}/student_peft" and records[0]["model"] == model
    assert records[0]["scales"] == [4, 8]  # the run's schedule
    local = storage.local_copy(out)
    assert np.asarray(Image.open(os.path.join(local, "00000.png"))).shape == (16, 16, 3)

    _clip_folder(tmp_path / "clip", 0)
    storage.copy_tree(str(tmp_path / "clip"), f"{gcs_bucket}/clip")
    assert evaluate.main(["--images", out, "--clip", f"{gcs_bucket}/clip", "--clip-batch-size", "2"]) == 0
    metrics = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert metrics["num_images"] == 2 and np.isfinite(metrics["clip_score"])
    assert metrics["metrics_sources"]["clip"] == f"{gcs_bucket}/clip"
