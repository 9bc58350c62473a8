"""`python -m swd_jax.cli.evaluate` end to end on tiny random models: FID, CLIP score and PickScore of a folder with
images.json equal the metrics computed directly (pytorch-fid distance, transformers CLIPModel cosines)."""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from swd_jax.cli import evaluate
from swd_jax.demo.tiny_kit import clip_folder as _clip_folder  # other tests import it from here
from swd_jax.demo.tiny_kit import random_inception_npz as _random_inception_npz
from swd_jax.eval import fid, image_chain
from swd_jax.eval import prompts as prompts_lib


def test_evaluate_cli(tmp_path, capsys, monkeypatch):
    # scipy's sqrtm of a singular 2048 x 2048 product (3 images here) takes minutes: record the statistics the
    # CLI hands to the Frechet distance (itself tested against pytorch-fid in test_eval_fid) and check those.
    seen = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: seen.append(stats) or 1.5)
    clip_ref = _clip_folder(tmp_path / "clip", 0)
    pick_ref = _clip_folder(tmp_path / "pick", 1)
    _random_inception_npz(tmp_path / "inception.npz")
    rng = np.random.default_rng(0)
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(real / f"r{i}.png")
    gen = tmp_path / "gen"
    gen.mkdir()
    prompts = ["a red cat", "two dogs on a bed", "castle"]
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    for i, im in enumerate(images):
        Image.fromarray(im).save(gen / f"{i:05d}.png")
    prompts_lib.write_index(str(gen), [{"file": f"{i:05d}.png", "prompt": p, "seed": prompts_lib.sample_seed(7, i)}
                                       for i, p in enumerate(prompts)])
    rc = evaluate.main(["--images", str(gen), "--inception", str(tmp_path / "inception.npz"), "--real-images",
                        str(real), "--clip", str(tmp_path / "clip"), "--pickscore", str(tmp_path / "pick"),
                        "--fid-batch-size", "3", "--clip-batch-size", "2"])
    assert rc == 0  # was 1: main returned the metrics dict to sys.exit
    assert "PickScore" in capsys.readouterr().out
    out = json.loads((gen / "metrics.json").read_text())
    assert out["num_images"] == 3

    # the same metrics computed directly
    scorer = fid.FIDScorer(str(tmp_path / "inception.npz"), batch_size=3)
    ref_stats = fid.feature_stats(scorer.features([np.asarray(Image.open(real / f"r{i}.png")) for i in range(3)],
                                                  generated=False))
    want = fid.feature_stats(scorer.features(images)) + ref_stats
    assert out["fid"] == 1.5 and len(seen) == 1
    for got, w in zip(seen[0], want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    pre = image_chain.ClipPreprocess.from_folder(str(tmp_path / "clip"))
    pixels = torch.from_numpy(np.stack([image_chain.clip_input(image_chain.official_512(im), pre) for im in images]))
    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))
    text = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")  # the official call
    for key, ref in (("clip_score", clip_ref), ("pickscore", pick_ref)):
        with torch.no_grad():
            i = ref.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2)).pooler_output
            t = ref.get_text_features(**text).pooler_output
        want = float(((i / i.norm(dim=-1, keepdim=True)) * (t / t.norm(dim=-1, keepdim=True))).sum(-1).mean())
        assert abs(out[key] - want) < 1e-5


@pytest.mark.parametrize("setup, argv, says", [
    (False, ["--clip", "{d}"], "images.json"),
    (True, [], "no metric to compute"),
    (True, ["--inception", "{d}/x.pth"], "reference statistics"),
    (True, ["--pickscore", "{d}", "--processor", "{d}"], "config.json not found"),
])
def test_evaluate_cli_errors(tmp_path, capsys, setup, argv, says):
    if setup:
        (tmp_path / "a.png").write_bytes(b"")
        prompts_lib.write_index(str(tmp_path), [{"file": "a.png", "prompt": "x"}])
    assert evaluate.main(["--images", str(tmp_path)] + [a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1], err
