"""The built-in digits demo, CI-sized: every stage runs a few steps through the real code path.

Asserts finite losses, checkpoints, an interrupted distillation that resumes where it stopped, cached stages on
a rerun, and the results table with its grids.
"""
import json
import os
import warnings

import jax
import numpy as np
import pytest

from configs import digits_demo
from swd_jax.demo import pipeline as demo, yardsticks as demo_eval


def ci_config():
    """digits_demo.py shrunk to seconds: 1-block width-16 teacher, 2 scales, 2 distillation steps per student."""
    c = digits_demo.get_config()
    c.demo.teacher.update(num_layers=1, attention_head_dim=16, num_attention_heads=1, caption_projection_dim=16,
                          joint_attention_dim=8, pooled_projection_dim=8, dual_attention_layers=(0,))
    c.demo.pretrain.update(steps=4, batch_size=8, ckpt_every=2, warmup=2, scales=(8, 16))
    c.demo.data.update(num_images=20, steps=3)
    c.demo.sample_batch = 10
    c.demo.eval.update(num_images=20, grid_rows=2, classifier_hidden=16)
    c.demo.baseline_scales = (16, 16)
    c.schedule.scales = (8, 16)
    c.schedule.boundaries = (0, 14, 28)
    c.lora.rank = c.lora.alpha = 2
    c.loss.n_fake_steps = 1
    c.loss.cls_blocks = c.loss.mmd_blocks = (0,)
    c.train.update(steps=2, batch_size=4, ckpt_every=1, log_every=1)
    return c


def test_demo_chain_runs_resumes_and_reports(tmp_path):
    c, wd = ci_config(), str(tmp_path)
    assert demo.run_demo(c, wd, stop_after=1) is None  # the SwD run stops after 1 of 2 iterations
    assert os.path.exists(os.path.join(wd, "teacher", "params"))
    assert demo.latest_step(os.path.join(wd, "swd", "checkpoints")) == 1
    result = demo.run_demo(c, wd)
    for name in ("swd", "fullres"):
        assert demo.latest_step(os.path.join(wd, name, "checkpoints")) == 2
        with open(os.path.join(wd, name, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f]
        assert [m["step"] for m in logged] == [1, 2]  # the resumed run continued at step 2
        assert all(np.isfinite(v) for m in logged for k, v in m.items() if k.startswith(("gen/", "fake/")))
    rows = {r["model"]: r for r in result["rows"]}
    assert len(rows) == 6
    assert all(0 <= r["prompt acc. %"] <= 100 and np.isfinite(r["FD"]) for r in rows.values())
    swd, full = rows["SwD student (DMD+GAN+PDM)"], rows["full-resolution student (DMD+GAN+PDM)"]
    assert 0 < swd["MFLOPs / image"] < full["MFLOPs / image"]
    assert os.path.exists(os.path.join(wd, "results.md")) and "SwD student" in result["table"]
    assert len([f for f in os.listdir(os.path.join(wd, "grids")) if f.endswith(".png")]) == 6


def test_merged_lora_equals_lora_forward():
    """The evaluation folds the student LoRA into the kernels; the forward must not change."""
    from swd_jax.models.layers import LORA, LoraConfig
    from swd_jax.models.mmdit import MMDiT
    cfg = demo.teacher_config(ci_config())
    lora = LoraConfig(rank=2, alpha=4.0)
    model = MMDiT(cfg, lora=lora)
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (2, 8, 8, 1))
    t = jax.numpy.array([300.0, 900.0])
    ctx, pooled = jax.random.normal(k[1], (2, 6, 8)), jax.random.normal(k[2], (2, 8))
    variables = model.init(k[3], x, t, ctx, pooled)
    base = jax.tree.map(lambda a: getattr(a, "value", a), variables["params"], is_leaf=lambda a: hasattr(a, "value"))
    trained = jax.tree.map(lambda a: jax.random.normal(k[4], a.shape) * 0.1, variables[LORA])  # B != 0
    want = model.apply({"params": base, LORA: trained}, x, t, ctx, pooled)
    got = MMDiT(cfg).apply({"params": demo.merge_lora(base, trained, lora.scale)}, x, t, ctx, pooled)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    assert demo_eval.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2*2I) = |m|^2 + 3
    b = 2.0 * rng.standard_normal((20000, 3)) + np.array([1.0, 2.0, 0.0])
    assert demo_eval.frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.03)


def test_classifier_and_fd_are_ours_and_fixed():
    """The yardsticks depend on no library's version (seeded float64 NumPy): golden split, accuracy and FD."""
    from scipy import linalg
    clf = demo_eval.DigitClassifier(8, hidden=16)
    assert (len(clf.real_test), round(clf.test_accuracy * len(clf.real_test))) == (359, 342)
    a, b = clf.features(clf.real_test), clf.features(clf.real_train)  # 4 dead ReLU units: singular covariances
    assert demo_eval.frechet_distance(a, b) == pytest.approx(0.3075009110651763, rel=1e-9)
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # = the sqrtm formula
    with warnings.catch_warnings():  # scipy: "Matrix is singular"; exact here all the same
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(c_a + c_b - 2 * np.real(linalg.sqrtm(c_a @ c_b)))
    assert demo_eval.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


def test_bad_teacher_training_settings_raise():
    from swd_jax.demo.teacher import TeacherTraining
    with pytest.raises(ValueError, match="sigma_sampling"):
        TeacherTraining(sigma_sampling="cosine")
    with pytest.raises(ValueError, match="p_uncond"):
        TeacherTraining(p_uncond=1.0)
