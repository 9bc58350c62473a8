"""LoRA: PEFT adapters on diffusers' SD3 transformer == our MMDiT with the converted `lora` collection."""
import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from swd_jax.convert.peft_lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, import_lora, init_lora,
                                       lora_modules)
from swd_jax.convert.transformer import convert_state_dict
from swd_jax.models.layers import LoraConfig
from swd_jax.models.mmdit import MMDiT, MMDiTConfig
from tests.torch_reference import rel_err, sd3_inputs, tiny_sd3_config, tiny_sd3_transformer, torch_forward

TOL = 1e-5  # fp32 relative, max-abs error over max-abs value
VARIANT, LAYERS = "sd35_medium", 2  # dual attention (attn2) + qk-norm: every adapted module kind
CFG = MMDiTConfig.from_dict(tiny_sd3_config(VARIANT, LAYERS))
# Both streams' attention and MLPs (a superset of the reference's default targets), scale 2.
LORA = LoraConfig(rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out", "net.0.proj", "net.2"))
BLOCKS = (0, 1)


@jax.jit
def _apply(params, lora, x_BHWC, t, c, p):
    """One jitted forward for every test (recompiles only per latent size)."""
    return MMDiT(CFG, lora=LORA).apply({"params": params, "lora": lora}, x_BHWC, t, c, p, feature_blocks=BLOCKS)


def run_ours(params, lora, inputs):
    x, t, c, p = inputs
    v, feats = _apply(params, lora, jnp.asarray(x.transpose(0, 2, 3, 1)), t, c, p)
    return np.asarray(v).transpose(0, 3, 1, 2), [np.asarray(f) for f in feats]


def assert_close(ours, ref, what):
    v, feats = ours
    ref_v, ref_feats = ref
    assert rel_err(v, ref_v) < TOL, what
    for i, f in zip(BLOCKS, feats, strict=True):
        assert rel_err(f, ref_feats[i]) < TOL, (what, i)


@pytest.fixture(scope="module")
def base():
    model = tiny_sd3_transformer(VARIANT, num_layers=LAYERS)
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, CFG)
    return model, params


def _peft_config(**kw):
    from peft import LoraConfig as PeftLoraConfig
    return PeftLoraConfig(r=LORA.rank, lora_alpha=int(LORA.alpha), target_modules=list(LORA.targets),
                          init_lora_weights="gaussian", **kw)


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    """A PEFT adapter trained 'by torch': random non-zero A and B on every target, saved by PEFT itself."""
    from peft import get_peft_model
    torch_model = copy.deepcopy(base[0])
    peft_model = get_peft_model(torch_model, _peft_config())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn_like(prm) * prm.shape[1] ** -0.5)
    folder = str(tmp_path_factory.mktemp("peft"))
    peft_model.save_pretrained(folder)
    return folder, torch_model.eval()  # get_peft_model injected the LoRA layers into torch_model in place


def test_peft_adapter_matches_ours(base, peft_folder):
    _, params = base
    folder, torch_model = peft_folder
    lora_cfg, lora = import_lora(folder, CFG)
    assert (lora_cfg.rank, lora_cfg.alpha, set(lora_cfg.targets)) == (LORA.rank, LORA.alpha, set(LORA.targets))
    assert len(lora_modules(CFG, LORA)) == 29  # 2 blocks: attn 8 (7 in the last) + attn2 4 + ff 2 (+ ff_context 2)
    no_lora = jax.tree.map(jnp.zeros_like, lora)
    for latent in (8, 12):
        inputs = sd3_inputs(tiny_sd3_config(VARIANT), batch=2, latent=latent)
        ours = run_ours(params, lora, inputs)
        assert_close(ours, torch_forward(torch_model, inputs, hook_blocks=BLOCKS), latent)
        assert rel_err(ours[0], run_ours(params, no_lora, inputs)[0]) > 0.1  # the adapter matters


def test_diffusers_lora_file_imports_like_peft(peft_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict
    folder, torch_model = peft_folder
    _, want = import_lora(folder, CFG)
    layers = get_peft_model_state_dict(torch_model)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "meta", transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=_peft_config().to_dict())
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=layers)
    cfg_meta, got_meta = import_lora(str(tmp_path / "meta"), CFG)
    cfg_bare, got_bare = import_lora(str(tmp_path / "bare" / "pytorch_lora_weights.safetensors"), CFG)
    assert (cfg_meta.rank, cfg_meta.alpha) == (LORA.rank, LORA.alpha)
    assert (cfg_bare.rank, cfg_bare.alpha) == (LORA.rank, float(LORA.rank))  # no config stored: alpha = rank
    for got in (got_meta, got_bare):
        jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def fresh_lora():
    return init_lora(CFG, LORA, jax.random.key(0))


@pytest.fixture(scope="module")
def our_adapter(fresh_lora, tmp_path_factory):
    lora = fresh_lora
    rng = np.random.default_rng(1)
    lora = jax.tree_util.tree_map_with_path(  # a trained-looking B (init has B = 0)
        lambda path, x: jnp.asarray(0.3 * rng.standard_normal(x.shape, np.float32)) if path[-1].key == "lora_B"
        else x, lora)
    folder = str(tmp_path_factory.mktemp("ours"))
    export_peft(lora, LORA, folder, cfg=CFG)
    return lora, folder


def test_init_lora_is_peft_gaussian(base, fresh_lora):
    lora = fresh_lora
    flat = {tuple(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(lora)[0]}
    assert len(flat) == 2 * 29
    assert flat[("transformer_blocks_0", "attn", "to_q", "lora_A")].shape == (CFG.inner_dim, LORA.rank)
    assert all(not x.any() for p, x in flat.items() if p[-1] == "lora_B")  # B = 0: student starts as the teacher
    a_all = np.concatenate([x.ravel() for p, x in flat.items() if p[-1] == "lora_A"])
    assert abs(a_all.std() * LORA.rank - 1) < 0.05  # A ~ N(0, (1/r)^2), PEFT "gaussian"
    inputs = sd3_inputs(tiny_sd3_config(VARIANT), batch=2, latent=8)
    v, _ = run_ours(base[1], lora, inputs)
    np.testing.assert_array_equal(v, run_ours(base[1], jax.tree.map(jnp.zeros_like, lora), inputs)[0])


def test_export_round_trip_is_exact(our_adapter):
    lora, folder = our_adapter
    cfg_back, back = import_lora(folder, CFG)
    assert (cfg_back.rank, cfg_back.alpha, set(cfg_back.targets)) == (LORA.rank, LORA.alpha, set(LORA.targets))
    jax.tree.map(np.testing.assert_array_equal, back, lora)
    tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    assert tensors["base_model.model.transformer_blocks.1.attn2.to_out.0.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer_blocks.0.ff_context.net.0.proj.lora_B.weight"].shape == (128, 4)


def test_our_export_loads_in_peft(base, our_adapter):
    from peft import PeftModel
    model, params = base
    lora, folder = our_adapter
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    inputs = sd3_inputs(tiny_sd3_config(VARIANT), batch=2, latent=8, seed=5)
    assert_close(run_ours(params, lora, inputs),
                 torch_forward(peft_model.base_model.model, inputs, hook_blocks=BLOCKS), "export")


def _rewrite(src, dst, drop=(), add=None, **config):
    """Copy an adapter folder, dropping/adding tensors and overriding adapter_config.json fields."""
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(os.path.join(src, ADAPTER_WEIGHTS)).items() if k not in drop}
    save_file(dict(tensors, **(add or {})), os.path.join(dst, ADAPTER_WEIGHTS))
    with open(os.path.join(src, ADAPTER_CONFIG)) as f:
        cfg = dict(json.load(f), **config)
    with open(os.path.join(dst, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_bad_adapters_name_the_problem(our_adapter, tmp_path):
    lora, folder = our_adapter
    pre = "base_model.model.transformer_blocks.0.attn"
    z = np.zeros((4, 32), np.float32)
    cases = [
        (dict(drop=[f"{pre}.to_k.lora_B.weight"]), r"transformer_blocks\.0\.attn\.to_k: missing lora_B"),
        (dict(drop=[f"{pre}.to_k.lora_A.weight", f"{pre}.to_k.lora_B.weight"]),
         r"transformer_blocks\.0\.attn\.to_k: missing \(lora_A and lora_B\)"),
        (dict(add={f"{pre}.norm_q.lora_A.weight": z, f"{pre}.norm_q.lora_B.weight": z.T}),
         r"transformer_blocks\.0\.attn\.norm_q: not a LoRA layer"),
        (dict(add={f"{pre}.to_q.lora_magnitude_vector": z[0]}), r"keys that are not .*to_q\.lora_magnitude_vector"),
        (dict(r=8), r"to_q: lora_A \(4, 32\), lora_B \(32, 4\); expected \(8, 32\) and \(32, 8\)"),
        (dict(use_dora=True), "DoRA"),
        (dict(use_rslora=True), "rsLoRA"),
        (dict(rank_pattern={"to_q": 8}), "per-module ranks"),
        (dict(alpha_pattern={"to_q": 8}), "per-module alphas"),
        (dict(layers_to_transform=[0]), "unsupported adapter config field layers_to_transform"),
        (dict(peft_type="LOHA"), "peft_type='LOHA' is not LORA"),
        (dict(target_modules=["to_q", "proj_out"]), r"match layers our MMDiT does not adapt.*\['proj_out'\]"),
        (dict(target_modules=["nothing_here"]), "match no layer"),
    ]
    for i, (kw, pattern) in enumerate(cases):
        with pytest.raises(ValueError, match=pattern):
            import_lora(_rewrite(folder, tmp_path / str(i), **kw), CFG)
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter"):
        import_lora(str(tmp_path), CFG)
    # Export refuses trees it cannot describe.
    broken = jax.tree.map(lambda x: x, lora)
    del broken["transformer_blocks_0"]["attn"]["to_q"]["lora_B"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_q: has only lora_A"):
        export_peft(broken, LORA, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not rank 8"):
        export_peft(lora, LoraConfig(rank=8, alpha=8.0), str(tmp_path / "y"))
    with pytest.raises(FileExistsError):
        export_peft(lora, LORA, folder)
