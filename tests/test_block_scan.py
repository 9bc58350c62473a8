"""Blocks under scan (stacked params) equal the unrolled model: forward, features, gradients; layouts round-trip."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from swd_jax.convert.transformer import convert_state_dict
from swd_jax.models.block_scan import block_groups, stack_blocks, unstack_blocks
from swd_jax.models.flux import Flux, FluxConfig
from swd_jax.models.layers import LORA, LoraConfig
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from tests.torch_reference import rel_err, sd3_inputs, tiny_sd3_config, tiny_sd3_transformer, torch_forward

TOL = 1e-6  # fp32, scan against unroll: the same operations in a loop; max-abs error over max-abs value
# Gradients: the whole tree within TOL (max-abs error over max-abs value of all leaves), each leaf within LEAF_TOL.
# A LoRA factor's gradient is a sum over every token in fp32 and the loop's fusion changes the summation order:
# the smallest leaves of the FLUX case differ by up to 2e-6 of their own scale (measured), 1e-8 of the tree's.
LEAF_TOL = 1e-5
LORA_CFG = LoraConfig(rank=2, alpha=2.0, targets=("to_q", "to_v", "net.2", "proj_mlp", "proj_out"))


def _perturb_lora(lora, key):
    """A non-zero LoRA B (a fresh LoRA is the identity), so the student differs from the teacher."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _assert_grads_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    scale = max(np.abs(b).max() for _, b in pairs)
    assert max(np.abs(a - b).max() for a, b in pairs) < TOL * scale
    for a, b in pairs:
        assert rel_err(a, b) < LEAF_TOL


def test_groups_cut_at_kind_remat_and_splits():
    kinds = [("b_", i, "dual" if i < 3 else ("pre" if i == 6 else "plain")) for i in range(7)]
    spans = lambda gs: [(g.start, g.stop - 1, g.name) for g in gs]
    assert spans(block_groups(kinds, scan=True)) == [(0, 2, "b_0_to_2"), (3, 5, "b_3_to_5"), (6, 6, "b_6")]
    assert spans(block_groups(kinds, scan=True, splits=(1, 4))) == [
        (0, 1, "b_0_to_1"), (2, 2, "b_2"), (3, 4, "b_3_to_4"), (5, 5, "b_5"), (6, 6, "b_6")]
    assert spans(block_groups(kinds, scan=True, plain_from=5)) == [
        (0, 2, "b_0_to_2"), (3, 4, "b_3_to_4"), (5, 5, "b_5"), (6, 6, "b_6")]
    assert len(block_groups(kinds, scan=False)) == 7


def _mmdit_case():
    """SD3.5-Medium-like: dual-attention blocks 0-2, plain 3-5, context-pre-only 6 (our random init)."""
    cfg = MMDiTConfig.from_dict(tiny_sd3_config("sd35_medium", 7) | {"dual_attention_layers": (0, 1, 2)})
    x, t, c, p = sd3_inputs(tiny_sd3_config("sd35_medium", 7), batch=2, latent=8)
    inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), jnp.asarray(p))
    params = nn.unbox(MMDiT(cfg).init(jax.random.key(5), *inputs)["params"])
    return cfg, params, inputs


@pytest.mark.parametrize("remat", [False, True])
def test_mmdit_scan_equals_unroll_forward_features_and_gradients(remat):
    cfg, params, inputs = _mmdit_case()
    kw = dict(lora=LORA_CFG, remat=remat, blocks_without_remat=2 if remat else 0)
    unrolled = MMDiT(cfg, **kw)
    scanned = MMDiT(cfg, scan_blocks=True, scan_splits=(1, 4), **kw)
    groups = scanned.block_groups()
    assert [g.size for g in groups] == [2, 1, 2, 1, 1]
    lora = _perturb_lora(nn.unbox(unrolled.init(jax.random.key(0), *inputs)[LORA]), jax.random.key(1))
    s_params, s_lora = stack_blocks(params, groups), stack_blocks(lora, groups)
    assert "transformer_blocks_0_to_1" in s_params and "transformer_blocks_0" not in s_params
    assert s_params["transformer_blocks_0_to_1"]["attn"]["to_q"]["kernel"].shape[0] == 2

    def loss(model, prm, lr, x):
        v, (f1, f4) = model.apply({"params": prm, LORA: lr}, x, *inputs[1:], feature_blocks=(1, 4))
        return jnp.mean(v ** 2) + jnp.mean(f1 * f4), (v, f1, f4)

    (l_u, out_u), g_u = jax.jit(jax.value_and_grad(lambda lr, x: loss(unrolled, params, lr, x), (0, 1),
                                                   has_aux=True))(lora, inputs[0])
    (l_s, out_s), g_s = jax.jit(jax.value_and_grad(lambda lr, x: loss(scanned, s_params, lr, x), (0, 1),
                                                   has_aux=True))(s_lora, inputs[0])
    for a, b in zip(out_s, out_u):
        assert rel_err(np.asarray(a), np.asarray(b)) < TOL
    assert abs(float(l_s) - float(l_u)) <= TOL * abs(float(l_u))
    _assert_grads_close(unstack_blocks(g_s[0], groups), g_u[0])
    assert rel_err(np.asarray(g_s[1]), np.asarray(g_u[1])) < TOL
    # features_only stops at the end of the feature block's group, and gives the same feature.
    (f1,) = scanned.apply({"params": s_params, LORA: s_lora}, *inputs, feature_blocks=(1,), features_only=True)
    assert rel_err(np.asarray(f1), np.asarray(out_u[1])) < TOL


@pytest.mark.parametrize("variant", ["sd3_medium", "sd35_large"])
def test_scanned_mmdit_matches_diffusers(variant):
    """The scanned model keeps the equivalence tolerance of tests/test_mmdit.py (1e-5) against diffusers."""
    model = tiny_sd3_transformer(variant, num_layers=4)
    cfg = MMDiTConfig.from_dict(tiny_sd3_config(variant, 4))
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    x, t, c, p = sd3_inputs(tiny_sd3_config(variant, 4), batch=2, latent=8)
    ref_v, ref_feats = torch_forward(model, (x, t, c, p), hook_blocks=(1,))
    scanned = MMDiT(cfg, scan_blocks=True, scan_splits=(1,))
    v, (f1,) = scanned.apply({"params": stack_blocks(params, scanned.block_groups())},
                             jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), jnp.asarray(p),
                             feature_blocks=(1,))
    assert rel_err(np.asarray(v).transpose(0, 3, 1, 2), ref_v) < 1e-5
    assert rel_err(np.asarray(f1), ref_feats[1]) < 1e-5


def test_flux_scan_equals_unroll_forward_features_and_gradients():
    cfg = FluxConfig(in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    t, g = jnp.array([300.0, 900.0]), jnp.array([3.5, 4.5])
    c, p = jax.random.normal(jax.random.key(1), (2, 5, 12)), jax.random.normal(jax.random.key(2), (2, 6))
    unrolled = Flux(cfg, lora=LORA_CFG)
    scanned = Flux(cfg, lora=LORA_CFG, scan_blocks=True, scan_splits=(1, 4))
    groups = scanned.block_groups()
    assert [(gr.name, gr.size) for gr in groups] == [
        ("transformer_blocks_0_to_1", 2), ("transformer_blocks_2", 1), ("single_transformer_blocks_0_to_1", 2),
        ("single_transformer_blocks_2", 1)]
    variables = nn.unbox(unrolled.init(jax.random.key(3), x, t, c, p, g))
    params, lora = variables["params"], _perturb_lora(variables[LORA], jax.random.key(4))

    def loss(model, prm, lr):
        v, feats = model.apply({"params": prm, LORA: lr}, x, t, c, p, g, feature_blocks=(1, 4))
        return jnp.mean(v ** 2) + sum(jnp.mean(f ** 2) for f in feats), (v,) + feats

    (_, out_u), g_u = jax.jit(jax.value_and_grad(lambda lr: loss(unrolled, params, lr), has_aux=True))(lora)
    (_, out_s), g_s = jax.jit(jax.value_and_grad(lambda lr: loss(scanned, stack_blocks(params, groups), lr),
                                                 has_aux=True))(stack_blocks(lora, groups))
    for a, b in zip(out_s, out_u):
        assert rel_err(np.asarray(a), np.asarray(b)) < TOL
    _assert_grads_close(unstack_blocks(g_s, groups), g_u)


def test_layouts_round_trip_through_optimizer_state_shardings_and_shapes():
    cfg, params, inputs = _mmdit_case()
    groups = MMDiT(cfg, scan_blocks=True, scan_splits=(1,)).block_groups()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = {"params": params, "opt": opt.init(params)}
    stacked = jax.jit(lambda s: stack_blocks(s, groups))(state)
    assert jax.tree.leaves(stacked["opt"][1][0].mu["transformer_blocks_3_to_5"])[0].shape[0] == 3
    back = unstack_blocks(stacked, groups)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params)
    s_abs = stack_blocks(abstract, groups)
    leaf = s_abs["transformer_blocks_3_to_5"]["ff"]["net_2"]["kernel"]
    assert leaf.shape[0] == 3 and leaf.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert jax.tree.map(lambda a: a.shape, unstack_blocks(s_abs, groups)) == jax.tree.map(lambda a: a.shape, params)


def test_a_feature_inside_a_scanned_group_is_one_line():
    cfg, params, inputs = _mmdit_case()
    scanned = MMDiT(cfg, scan_blocks=True)
    with pytest.raises(ValueError, match=r"feature blocks \[1\] fall inside scanned blocks \['0..2'\].*scan_splits"):
        scanned.apply({"params": stack_blocks(params, scanned.block_groups())}, *inputs, feature_blocks=(1,))


def test_training_scanned_equals_unrolled_and_resumes_across_the_switch(tmp_path):
    """The trainer with model.scan_blocks on and off: the same losses and the same stored (unrolled) checkpoint
    and export; a run checkpointed scanned resumes unrolled."""
    import json

    from safetensors.numpy import load_file

    from swd_jax.train.checkpoint import Checkpointer
    from swd_jax.train.loop import train
    from tests.test_train import small_config

    # Dual-attention blocks 0-2, plain 3-4, context-pre-only 5; features at block 1: groups 0-1 and 3-4 scanned.
    over = {"model.random.num_layers": 6, "model.random.dual_attention_layers": (0, 1, 2), "loss.cls_blocks": (1,),
            "loss.mmd_blocks": (1,), "loss.n_fake_steps": 1, "schedule.scales": (8,), "schedule.boundaries": (0, 28),
            "train.steps": 4, "train.ckpt_every": 2,
            "train.log_every": 1, "train.export_peft": True}
    one = jax.devices()[:1]
    # Unrolled throughout; scanned for steps 1-2 (checkpoint 2), then resumed unrolled to step 4.
    train(small_config(**over, **{"model.scan_blocks": False}), str(tmp_path / "unrolled"), devices=one)
    train(small_config(**over), str(tmp_path / "switch"), stop_after=2, devices=one)
    ckpt = lambda name: Checkpointer(str(tmp_path / name / "checkpoints"), save_every=2, keep=3)
    scanned_2 = ckpt("switch").read(2)[0]
    train(small_config(**over, **{"model.scan_blocks": False}), str(tmp_path / "switch"), devices=one)
    rows = {name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")] for name in ("unrolled", "switch")}
    assert [r["step"] for r in rows["switch"]] == [1, 2, 3, 4]
    for a, b in zip(rows["switch"], rows["unrolled"]):
        for k in ("fake/loss", "gen/loss", "gen/dmd", "gen/pdm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=(a["step"], k))
    # The scanned run's checkpoint holds the unrolled layout and the unrolled run's numbers.
    unrolled_2 = ckpt("unrolled").read(2)[0]
    assert "transformer_blocks_0" in scanned_2["student"] and "transformer_blocks_0_to_1" not in scanned_2["student"]
    assert jax.tree.structure(scanned_2) == jax.tree.structure(unrolled_2)
    for a, b in zip(jax.tree.leaves(scanned_2), jax.tree.leaves(unrolled_2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    peft = {name: load_file(str(tmp_path / name / "student_peft" / "adapter_model.safetensors"))
            for name in ("unrolled", "switch")}
    assert peft["switch"].keys() == peft["unrolled"].keys()
    for k in peft["switch"]:
        np.testing.assert_allclose(peft["switch"][k], peft["unrolled"][k], rtol=1e-4, atol=1e-7, err_msg=k)
