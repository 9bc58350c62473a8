"""The built-in digits demo, CI-sized: every stage runs a few steps through the real code path.

Asserts finite losses, checkpoints, an interrupted distillation that resumes where it stopped, cached stages on
a rerun, and the results table with its grids.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import digits_demo
from swd_jax import demo, demo_eval


def ci_config():
    """digits_demo.py shrunk to seconds: 1-block width-16 teacher, 2 scales, 2 distillation steps per student."""
    c = digits_demo.get_config()
    c.demo.teacher.update(num_layers=1, attention_head_dim=16, num_attention_heads=1, caption_projection_dim=16,
                          joint_attention_dim=8, pooled_projection_dim=8, dual_attention_layers=(0,))
    c.demo.pretrain.update(steps=4, batch_size=8, ckpt_every=2, warmup=2)
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
