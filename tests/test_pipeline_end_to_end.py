"""From a (tiny) diffusers SD3 folder to a trained, exported student: precompute -> train -> PEFT adapter.

The same commands a user runs on SD3.5 (`swd_jax.cli.precompute`, `swd_jax.train` with model.source="diffusers"
and data.kind="precomputed"), on tiny random components built offline.
"""
import json

import numpy as np
import torch

from configs import tiny
from tests.test_prompt_encoding import T5_LEN, _dataset, sd3  # noqa: F401  (module-scoped fixture)


def test_precompute_train_export(sd3, tmp_path):  # noqa: F811
    import jax
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    from swd_jax.train.precompute import precompute
    from swd_jax.train.loop import train

    root = sd3[1]
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    transformer.save_pretrained(root / "transformer")
    data = _dataset(tmp_path / "data", 4)
    out = tmp_path / "pre"
    precompute(str(root), str(data), str(out), (4, 8), shard_size=4, dtype="float32", param_dtype="float32",
               store_dtype="float32", devices=jax.devices()[:1], progress=False, max_sequence_length=T5_LEN)

    c = tiny.get_config()
    c.model.source, c.model.path = "diffusers", str(root)
    c.data.kind, c.data.path = "precomputed", str(out)
    c.schedule.scales, c.schedule.boundaries = (4, 8), (0, 14, 28)
    c.loss.n_fake_steps, c.loss.cls_blocks, c.loss.mmd_blocks = 1, (0,), (0,)
    c.train.steps, c.train.batch_size, c.train.sample_every, c.train.num_samples = 1, 2, 1, 2
    # config.eval: CLIP score of the student's samples every step (a tiny CLIPModel), checked below
    from tests.test_evaluate import _clip_folder
    _clip_folder(tmp_path / "clip", seed=3)
    (tmp_path / "captions.csv").write_text("caption\na low tower\nthe red tower\n")
    c.eval.every, c.eval.sets, c.eval.num_samples = 1, (f"towers:{tmp_path / 'captions.csv'}",), 2
    c.eval.clip, c.eval.batch = str(tmp_path / "clip"), 2
    work = tmp_path / "run"
    last = train(c, str(work), devices=jax.devices()[:1])
    assert all(np.isfinite(v) for v in last.values()), last
    assert (work / "samples" / "step_000001.png").exists()  # decoded by our VAE from the pipeline folder
    assert (work / "checkpoints" / "1").is_dir()
    adapter = work / "student_peft"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == c.lora.rank
    PeftModel.from_pretrained(SD3Transformer2DModel.from_pretrained(root / "transformer"), str(adapter))

    # the logged CLIP score is that of the exported student's samples, scored as swd-evaluate does
    from swd_jax.eval.protocol import Evaluator, evaluate_images
    from swd_jax.pipeline import SwDPipeline
    logged = [json.loads(line) for line in open(work / "metrics.jsonl") if "eval/towers/clip_score" in line]
    assert [r["step"] for r in logged] == [1]
    pipe = SwDPipeline.from_pretrained(str(root), lora=str(work), max_sequence_length=c.data.max_sequence_length,
                                       devices=jax.local_devices()[:1])
    prompts = ["a low tower", "the red tower"]
    images = pipe.generate(prompts, pipe.sampler("scale_wise"), seed=0, batch_size=2)
    want = evaluate_images(list(images), prompts, Evaluator.load(clip=str(tmp_path / "clip")), ["clip_score"])
    assert abs(logged[0]["eval/towers/clip_score"] - want["clip_score"]) < 1e-5, (logged, want)
    assert (adapter / "pytorch_lora_weights.safetensors").exists()  # pipe.load_lora_weights(adapter) reads it


def test_online_encoding_source_matches_precompute_layout(sd3, tmp_path):  # noqa: F811
    """data.kind="images": image records encoded on the fly give the batches the train step expects."""
    import jax

    from swd_jax.train.records import build_image_dataset
    from swd_jax.method.schedule import ScaleSchedule
    from swd_jax.train.sources import OnlineSource

    data = _dataset(tmp_path / "data", 4)
    records = build_image_dataset(str(data), str(tmp_path / "records"))
    schedule = ScaleSchedule(scales=(4, 8), boundaries=(0, 14, 28))
    src = OnlineSource(records, str(sd3[1]), schedule, global_batch=2, seed=0, max_sequence_length=T5_LEN,
                       devices=jax.devices()[:2])
    b = src.batches(1, 2)
    assert b["x"].shape == b["x_std"].shape == (2, 2, 8, 8, 4)
    assert b["x_prev"].shape == b["x_prev_std"].shape == (2, 2, 4, 4, 4) and (b["x_std"] > 0).all()
    assert b["context"].shape == (2, 2, 77 + T5_LEN, 64) and b["pooled"].shape == (2, 2, 40)
    assert src.position == 4 and all(np.isfinite(v).all() for v in b.values())
    assert src.uncond()["context"].shape == (1, 77 + T5_LEN, 64)
    assert src.validation_cond(3)["pooled"].shape == (3, 40)
