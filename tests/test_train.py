"""The SwD trainer: loss goes down, sharded == single device, resume == uninterrupted, clear config errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from swd_jax.train.loop import compile_iterations, to_device, train
from swd_jax.train.setup import build_run
from swd_jax.train.sources import make_source


def small_config(**overrides):
    """tiny.py with 2 scale intervals and 2 fake steps per generator step: few, small compiles."""
    c = tiny.get_config()
    c.model.random.num_layers = 2
    c.model.random.dual_attention_layers = (0,)
    c.schedule.scales = (8, 16)
    c.schedule.boundaries = (0, 14, 28)
    c.loss.n_fake_steps = 2
    c.loss.cls_blocks = (0,)
    c.loss.mmd_blocks = (0,)
    c.train.export_peft = False
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, v)
    return c


def one_iteration(c, devices):
    run = build_run(c, devices)
    source = make_source(c, run.models.schedule, run.transformer_config)
    uncond = {k: jax.device_put(np.asarray(v)) for k, v in source.uncond().items()}
    fn = compile_iterations(run, source)[0]
    with jax.set_mesh(run.mesh):
        state, metrics = fn(run.state, run.base, to_device(run, source.batches(0, c.loss.n_fake_steps + 1)), uncond)
    return jax.device_get(state), jax.device_get(metrics), run


def test_sharded_step_equals_single_device():
    c1 = small_config(**{"mesh.shape": (1, 1, 1)})
    c8 = small_config(**{"mesh.shape": (2, 4, 1)})
    s1, m1, _ = one_iteration(c1, jax.devices()[:1])
    s8, m8, run8 = one_iteration(c8, jax.devices())
    # The base weights are FSDP-sharded over their model dimension; the batch is split over data x fsdp.
    q = run8.base["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert q.sharding.spec[0] == "fsdp" and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 4
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-6, err_msg=k)
    # Reductions run in a different order on 8 devices: float32 rounding, nothing more.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_loss_goes_down_and_resume_equals_uninterrupted(tmp_path):
    c = small_config(**{"train.steps": 50, "train.ckpt_every": 25, "train.log_every": 1})
    one = jax.devices()[:1]
    train(c, str(tmp_path / "full"), devices=one)
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert len(rows) == 50 and all(np.isfinite(r["gen/loss"]) and np.isfinite(r["fake/loss"]) for r in rows)
    # Each fake step draws its noise level per example, so single steps are noisy: compare the mean of all
    # fake updates (fake/loss_mean) over the first and last 15 iterations, and the fitted trend.
    curve = np.array([r["fake/loss_mean"] for r in rows])
    first, last = curve[:15].mean(), curve[-15:].mean()
    assert last < 0.85 * first and np.polyfit(np.arange(50), curve, 1)[0] < 0, (first, last, curve.round(3))
    # The generator losses are not asserted: the tiny teacher is random, so DMD/PDM have no target to reach.

    # Interrupted after 25 (checkpoint), resumed to 50: same metrics and state as the uninterrupted run.
    train(c, str(tmp_path / "resumed"), stop_after=25, devices=one)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["25"]
    train(c, str(tmp_path / "resumed"), devices=one)
    rows2 = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
    for a, b in zip(rows[25:], rows2[25:]):
        for k in ("fake/loss", "gen/loss", "gen/dmd", "gen/pdm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=(a["step"], k))


def test_bad_config_values_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the data x fsdp"):
        build_run(small_config(**{"train.batch_size": 6, "mesh.shape": (4, 1, 1)}), jax.devices()[:4])
    with pytest.raises(ValueError, match="boundaries"):
        build_run(small_config(**{"schedule.boundaries": (0, 7, 14, 28)}), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"cls_blocks \[5\] outside"):
        build_run(small_config(**{"loss.cls_blocks": (5,)}), jax.devices()[:1])
    with pytest.raises(ValueError, match="model.source='nope'"):
        build_run(small_config(**{"model.source": "nope"}), jax.devices()[:1])
    with pytest.raises(ValueError, match="model.attention_impl='flash'; expected one of"):
        build_run(small_config(**{"model.attention_impl": "flash"}), jax.devices()[:1])
    # An unknown field on the command line (configs are locked there) stops the CLI with its name.
    out = subprocess.run([sys.executable, "-m", "swd_jax.train", "--config", "configs/tiny.py", "--workdir",
                          "/nonexistent/never_written", "--config.optim.learning_rate=1"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode != 0 and "learning_rate" in out.stderr, out.stderr[-2000:]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from swd_jax.train.checkpoint import Checkpointer
    from swd_jax.train.loop import _check_finite
    ckpt = Checkpointer(str(tmp_path), save_every=1, keep=2)
    for s in (1, 2):
        ckpt.save(s, {"w": np.ones(3, np.float32)}, {"step": s, "data_position": 8 * s}, force=True)
    # The loss of step 3 is computed from the state of step 2: that checkpoint is moved aside, 1 is kept.
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: \{'gen/dmd': nan\}.*Checkpoint 2, "
                                                  r"which gave it, was moved.*step 1\) is kept"):
        _check_finite(3, {"gen/dmd": float("nan"), "gen/pdm": 0.1}, ckpt)
    assert ckpt.all_steps() == [1] and os.path.isdir(tmp_path / "2.nonfinite")
    ckpt.close()


def test_remat_from_scale_changes_the_program_not_the_numbers():
    """model.remat_from_scale=16: interval 0 (latent 8) runs without remat, interval 1 (16) with it; one iteration
    gives what remat everywhere gives (remat recomputes, it does not change the arithmetic), from the same weights
    in the same stacked layout."""
    from swd_jax.train.setup import interval_models
    c_all = small_config(**{"mesh.shape": (1, 1, 1), "model.remat": True})
    c_from = small_config(**{"mesh.shape": (1, 1, 1), "model.remat": True, "model.remat_from_scale": 16})
    s_all, m_all, _ = one_iteration(c_all, jax.devices()[:1])
    s_from, m_from, run = one_iteration(c_from, jax.devices()[:1])
    assert not any(g.remat for g in interval_models(run, 0).transformer.block_groups())
    assert interval_models(run, 1).transformer is run.models.transformer and run.models.transformer.remat
    for k in m_all:
        np.testing.assert_allclose(m_from[k], m_all[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # The state after one AdamW step: its first update is lr * g / (|g| + eps), which for a gradient near eps turns
    # the float32 reordering of the recomputed forward (2e-7 relative) into up to 1e-3 of lr (8e-7 measured).
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s_all), jax.tree.leaves(s_from)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=2e-6 * c_all.optim.lr / 1e-3,
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"model.remat_from_scale=12: expected 0 .* one of the schedule's scales "
                                         r"\(8, 16\)"):
        build_run(small_config(**{"mesh.shape": (1, 1, 1), "model.remat_from_scale": 12}), jax.devices()[:1])
