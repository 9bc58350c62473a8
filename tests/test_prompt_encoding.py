"""SD3 prompt encoding vs diffusers' StableDiffusion3Pipeline.encode_prompt, on tiny encoders and tokenizers
built offline here (a byte-level BPE CLIP vocabulary and a Unigram T5 vocabulary)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from swd_jax.convert.prompt_encoding import SD3PromptEncoder, check_widths
from swd_jax.convert.verify_components import compare_components
from swd_jax.demo import tiny_kit
from swd_jax.demo.tiny_kit import CLIP_MERGES, CLIP_VOCAB, T5_PIECES, TINY_VAE  # noqa: F401  (other tests import them)
from swd_jax.demo.tiny_kit import perturbed_save as _save  # noqa: F401
from swd_jax.demo.tiny_kit import write_images as _dataset
from swd_jax.models.text import CLIPTextConfig, T5Config

PROMPTS = ["a low tower", "", "the red lower tower, lowest and newer " * 4]  # the last is truncated everywhere
T5_LEN = 16


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error every parity test here asserts."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers pipeline without transformer, its folder): the tiny random SD3 of `swd-tiny-kit`."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **tiny_kit.sd3_components(root))
    return pipe, root


def test_encode_prompt_matches_pipeline(sd3):
    pipe, root = sd3
    enc = SD3PromptEncoder(str(root), max_sequence_length=T5_LEN)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                      max_sequence_length=T5_LEN)
    ours, ours_pooled = enc.encode_prompt(PROMPTS)
    assert ours.shape == pe.shape == (3, 77 + T5_LEN, 64) and ours_pooled.shape == pooled.shape == (3, 40)
    assert rel_err(ours, pe) < 1e-5 and rel_err(ours_pooled, pooled) < 1e-5
    assert np.all(np.asarray(ours)[:, :77, 40:] == 0)  # CLIP features zero-padded to the T5 width
    un, un_pooled = enc.unconditional(3)
    assert rel_err(un, npe) < 1e-5 and rel_err(un_pooled, npooled) < 1e-5
    ids = enc.tokenize(PROMPTS)
    assert ids["clip_l"].shape == (3, 77) and ids["t5"].shape == (3, T5_LEN)
    assert ids["clip_g"][0, -1] == 0 and ids["clip_l"][0, -1] == CLIP_VOCAB.index("<|endoftext|>")  # pad tokens


def test_bad_folders_and_widths(sd3, tmp_path):
    _, root = sd3
    partial = tmp_path / "partial"
    shutil.copytree(root, partial, ignore=shutil.ignore_patterns("tokenizer_3"))
    with pytest.raises(FileNotFoundError, match=r"lacks component folder\(s\) \['tokenizer_3'\]"):
        SD3PromptEncoder(str(partial))
    cfg = json.loads((partial / "transformer" / "config.json").read_text())
    (partial / "tokenizer_3").mkdir()
    (partial / "transformer" / "config.json").write_text(json.dumps({**cfg, "joint_attention_dim": 4096}))
    with pytest.raises(ValueError, match="joint_attention_dim=4096 but the T5 encoder width d_model=64"):
        SD3PromptEncoder(str(partial))
    with pytest.raises(ValueError, match="exceed the T5 width"):
        check_widths(CLIPTextConfig(hidden_size=768), CLIPTextConfig(hidden_size=1280, num_attention_heads=20),
                     T5Config(d_model=1024))
    with pytest.raises(ValueError, match="pooled_projection_dim=2048"):
        check_widths(CLIPTextConfig(projection_dim=768), CLIPTextConfig(projection_dim=1024), T5Config(),
                     {"joint_attention_dim": 4096, "pooled_projection_dim": 2048})
    os.rmdir(partial / "tokenizer_3")


def test_compare_components_runs(sd3):
    """The real-weight check that `swd_jax.cli.verify` calls, here on the tiny folder."""
    errs = compare_components(str(sd3[1]), image_size=16, prompts=PROMPTS[:2], max_sequence_length=T5_LEN,
                              torch_device="cpu")
    assert {"vae.decode", "clip_l.penultimate", "clip_g.text_embeds", "t5.last_hidden_state"} <= set(errs)
    assert all(v < 1e-5 for v in errs.values()), errs


def test_precompute_shards_resume_and_bad_images(sd3, tmp_path):
    import jax

    from swd_jax.train.records import decode_array_record, decode_image, open_source
    from swd_jax.train.precompute import precompute

    root, data = str(sd3[1]), _dataset(tmp_path / "data", 5)
    kw = dict(shard_size=2, dtype="float32", param_dtype="float32", store_dtype="float32",
              devices=jax.devices()[:2], progress=False, max_sequence_length=T5_LEN)
    out = tmp_path / "out"
    assert precompute(root, str(data), str(out), (4, 6, 8), **kw) == {"written": 5, "skipped_shards": 0, "bad": 0}
    shards = sorted(out.glob("*.array_record"))
    assert [p.name for p in shards] == [f"precomputed-0000{i}-of-00003.array_record" for i in range(3)]
    records = [decode_array_record(open_source(str(out)).records[i]) for i in range(5)]
    assert [r["file_name"] for r in records] == [f"{i}.png" for i in range(5)]
    with torch.no_grad():  # references: the diffusers pipeline and VAE, torch area downscaling
        embeds, uncond, pooled, _ = sd3[0].encode_prompt([r["prompt"] for r in records], None, None,
                                                         max_sequence_length=T5_LEN)
        ref_vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"))
        img = torch.stack([torch.from_numpy(decode_image((data / f"{i}.png").read_bytes(), None, "float32"))
                           for i in range(5)]).permute(0, 3, 1, 2)
        # the official sample_batch: area to 8 s, then THAT to 8 s' (the scale before s; s itself at the first)
        down = {s: torch.nn.functional.interpolate(img, size=2 * s, mode="area") for s in (4, 6, 8)}
        posteriors = {f"{s}": ref_vae.encode(down[s]).latent_dist for s in (4, 6, 8)}
        posteriors.update({f"prev_{s}": ref_vae.encode(torch.nn.functional.interpolate(
            down[s], size=2 * p, mode="area")).latent_dist for s, p in ((6, 4), (8, 6))})
    assert rel_err(np.stack([r["prompt_embeds"] for r in records]), embeds) < 1e-5
    assert rel_err(np.stack([r["pooled_prompt_embeds"] for r in records]), pooled) < 1e-5
    with np.load(out / "uncond.npz") as z:
        assert rel_err(z["prompt_embeds"], uncond[:1]) < 1e-5 and z["pooled_prompt_embeds"].shape == (1, 40)
    # posterior moments, normalised: mean (m - shift) * scale, std * scale; no prev_ at the first scale
    assert {k for k in records[0] if "_" in k and k[-1].isdigit()} == {f"{a}_{s}" for a in ("mean", "std")
                                                                       for s in (4, 6, 8)} | {
        f"prev_{a}_{s}" for a in ("mean", "std") for s in (6, 8)}
    for name, post in posteriors.items():
        mean, std = (t.permute(0, 2, 3, 1).numpy() for t in (post.mean, post.std))
        prefix = "prev_" if name.startswith("prev_") else ""
        s = name.removeprefix("prev_")
        want_mean = (mean - TINY_VAE["shift_factor"]) * TINY_VAE["scaling_factor"]
        assert rel_err(np.stack([r[f"{prefix}mean_{s}"] for r in records]), want_mean) < 1e-5, name
        assert rel_err(np.stack([r[f"{prefix}std_{s}"] for r in records]), std * TINY_VAE["scaling_factor"]) < 1e-5
    assert json.loads((out / "precompute.json").read_text())["format"] == 2
    # resume: only the missing shard is redone; other settings into the same folder raise
    shards[1].unlink()
    assert precompute(root, str(data), str(out), (4, 6, 8), **kw) == {"written": 2, "skipped_shards": 2, "bad": 0}
    with pytest.raises(ValueError, match="other settings.*scales"):
        precompute(root, str(data), str(out), (4, 8), **kw)
    # an undecodable image: named, or skipped and counted
    bad = _dataset(tmp_path / "bad", 3, bad=1)
    with pytest.raises(ValueError, match=r"cannot decode image .*1\.png"):
        precompute(root, str(bad), str(tmp_path / "out_bad"), (4, 6, 8), **kw)
    counts = precompute(root, str(bad), str(tmp_path / "out_bad2"), (4, 6, 8), skip_bad=True, **kw)
    assert counts == {"written": 2, "skipped_shards": 0, "bad": 1}
    assert decode_array_record(open_source(str(tmp_path / "out_bad2")).records[1])["file_name"] == "2.png"
