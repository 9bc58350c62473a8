"""FID: Frechet distance vs pytorch-fid's, the official image chain vs PIL / transformers, the scorer's plumbing."""
import numpy as np
import pytest
from PIL import Image

from tests import torchvision_inception

_, fid_score = torchvision_inception.import_pytorch_fid()  # CI: pip install --no-deps pytorch-fid

from swd_jax.demo.tiny_kit import random_inception_npz as _random_inception_npz  # noqa: E402
from swd_jax.eval import fid, image_chain  # noqa: E402


def _stats(rng, n, d, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift
    return np.mean(x, 0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n", [64, 12])  # full rank, and rank-deficient covariances (N < D)
def test_frechet_distance_matches_pytorch_fid(n):
    rng = np.random.default_rng(n)
    a, b = _stats(rng, n, 24), _stats(rng, n, 24, shift=0.5)
    ours, theirs = fid.frechet_distance(*a, *b), fid_score.calculate_frechet_distance(*a, *b)
    assert abs(ours - theirs) <= 1e-9 * abs(theirs)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-6


def test_feature_stats_and_npz(tmp_path):
    f = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    mu, sigma = fid.feature_stats(f)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    mu2, sigma2 = fid.load_stats(str(tmp_path / "ref.npz"))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_stats(str(tmp_path / "bad.npz"))


def test_official_512_is_pils_default_resize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(image_chain.official_512(np.asarray(img))), np.asarray(img.resize((512, 512))))


@pytest.mark.parametrize("wh,new,left_top", [((300, 200), (384, 256), (64, 0)),
                                             ((301, 200), (385, 256), (64, 0)),  # round(64.5) = 64, as torchvision
                                             ((256, 513), (256, 513), (0, 128))])  # round(128.5) = 128
def test_fid_input_is_torchvision_resize_crop(wh, new, left_top):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, wh[::-1] + (3,), dtype=np.uint8))
    l, t = left_top
    want = np.asarray(img.resize(new, Image.Resampling.LANCZOS).crop((l, t, l + 256, t + 256)), np.float32) / 255
    got = image_chain.fid_input(np.asarray(img))
    assert got.shape == (256, 256, 3) and got.dtype == np.float32
    assert np.array_equal(got, want)


@pytest.mark.parametrize("wh", [(512, 512), (300, 257), (240, 333)])
def test_clip_input_matches_transformers_processor(wh):
    import transformers
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, wh[::-1] + (3,), dtype=np.uint8))
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = image_chain.clip_input(np.asarray(img))
    assert got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_scorer_batches_folder_stats(tmp_path):
    """Padded batches give each image its own features; a folder's statistics skip non-images."""
    _random_inception_npz(tmp_path / "inception.npz")
    scorer = fid.FIDScorer(str(tmp_path / "inception.npz"), batch_size=3)
    rng = np.random.default_rng(3)
    folder = tmp_path / "real"
    folder.mkdir()
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((256, 256), (300, 280), (260, 400),
                                                                           (256, 256))]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    feats = scorer.features(images, generated=False)
    assert feats.shape == (4, 2048)
    alone = scorer.features_of_inputs([image_chain.fid_input(images[3])])  # batch of one, zero-padded
    np.testing.assert_allclose(feats[3], alone[0], rtol=1e-5, atol=1e-5 * np.abs(feats).max())
    mu, sigma = scorer.reference_stats(str(folder))
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, fid.feature_stats(feats)[1], rtol=1e-6, atol=1e-9 * np.abs(sigma).max())
    with pytest.raises(FileNotFoundError, match="no images"):
        fid.image_files(str(tmp_path))
