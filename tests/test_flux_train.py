"""SwD training of a tiny random FLUX-dev (model.kind='flux'): the same trainer and losses as the MMDiT, the
teacher at its embedded guidance (one pass, no CFG batch), finite losses, resume == uninterrupted, PEFT export."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from swd_jax.train.loop import train
from swd_jax.train.setup import build_run
from swd_jax.train.steps import generator_loss
from tests.test_train import small_config

TINY_FLUX = dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def flux_config(**overrides):
    """tests.test_train's small config on a tiny FLUX-dev: 1 double + 1 single block, 1-channel latents."""
    c = small_config(**{"loss.cfg_teacher": 1.0, "loss.cls_blocks": (1,), "loss.mmd_blocks": (0,)})
    c.model.kind = "flux"
    c.model.random = ml_collections.ConfigDict(TINY_FLUX)
    c.model.guidance = 4.5
    c.loss.guidance_teacher = 3.5
    c.lora.targets = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_mlp", "proj_out")
    for k, v in overrides.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, v)
    return c


def test_flux_training_runs_resumes_and_exports(tmp_path):
    c = flux_config(**{"train.steps": 2, "train.ckpt_every": 1, "train.log_every": 1, "train.export_peft": True,
                       "train.sample_every": 2, "train.num_samples": 2})
    one = jax.devices()[:1]
    train(c, str(tmp_path / "full"), devices=one)
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    keys = ("fake/loss", "fake/mse", "fake/gan_d", "gen/loss", "gen/dmd", "gen/gan_g", "gen/pdm", "gen/grad_norm")
    assert len(rows) == 2 and all(np.isfinite(r[k]) for r in rows for k in keys)
    assert rows[-1]["gen/grad_norm"] > 0  # the student learns through the FLUX passes
    assert os.path.exists(tmp_path / "full" / "samples" / "step_000002.png")
    adapter = json.load(open(tmp_path / "full" / "student_peft" / "adapter_config.json"))
    assert set(adapter["target_modules"]) >= {"to_q", "proj_mlp"}
    assert os.path.exists(tmp_path / "full" / "student_peft" / "pytorch_lora_weights.safetensors")

    train(c, str(tmp_path / "resumed"), stop_after=1, devices=one)  # interval 0, then resumed at interval 1
    train(c, str(tmp_path / "resumed"), devices=one)
    rows2 = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert len(rows2) == 2
    for a, b in zip(rows, rows2):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=(a["step"], k))


def test_flux_teacher_is_one_guided_pass():
    run = build_run(flux_config(**{"loss.do_gan": False, "loss.do_pdm": False}), jax.devices()[:1])
    m, base, cfg = run.models, run.base, run.transformer_config
    assert m.guidance == 4.5
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, 8, 8, 1))
    sigma, ctx, pooled = jnp.array([0.3, 0.8]), jax.random.normal(key, (2, 5, 32)), jnp.ones((2, 16))
    direct = m.transformer.apply({"params": base}, x, 1000.0 * sigma, ctx, pooled, guidance_B=jnp.full((2,), 4.5))
    np.testing.assert_array_equal(m.velocity(base, None, x, sigma, ctx, pooled), direct)
    assert not np.allclose(m.velocity(base, None, x, sigma, ctx, pooled, guidance=1.0), direct)

    # DMD at guidance_teacher: a NaN unconditional batch cannot reach it (no doubled CFG batch), and the
    # teacher's guidance changes it.
    batch = {"x": x, "x_prev": x, "context": ctx, "pooled": pooled}
    uncond = {"context": jnp.full((1, 5, 32), jnp.nan), "pooled": jnp.full((1, 16), jnp.nan)}
    fake = run.state["fake"]
    dmd = lambda mm: float(generator_loss(mm, run.state["student"], base, fake, batch, uncond, 0, key)[1]["gen/dmd"])
    d35 = dmd(m)
    d10 = dmd(dataclasses_replace_loss(m, guidance_teacher=1.0))
    assert np.isfinite(d35) and np.isfinite(d10) and abs(d35 - d10) > 1e-6 * abs(d35)
    assert cfg.num_blocks == 2


def dataclasses_replace_loss(m, **changes):
    import dataclasses
    return dataclasses.replace(m, loss=dataclasses.replace(m.loss, **changes))


def test_flux_config_errors():
    one = jax.devices()[:1]
    with pytest.raises(ValueError, match="FLUX-dev is guidance-distilled.*cfg_teacher=1.0"):
        build_run(flux_config(**{"loss.cfg_teacher": 7.0}), one)
    with pytest.raises(ValueError, match="model.guidance=0.0: this FLUX model has a guidance embedding"):
        build_run(flux_config(**{"model.guidance": 0.0}), one)
    with pytest.raises(ValueError, match="loss.guidance_teacher=0.0: the FLUX-dev teacher"):
        build_run(flux_config(**{"loss.guidance_teacher": 0.0}), one)
    with pytest.raises(ValueError, match=r"model.random has fields \['axes_dims_rope'.*MMDiTConfig"):
        build_run(flux_config(**{"model.kind": "mmdit"}), one)
    with pytest.raises(ValueError, match=r"loss.cls_blocks \[2\] outside the model's blocks 0..1"):
        build_run(flux_config(**{"loss.cls_blocks": (2,)}), one)
