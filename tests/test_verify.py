"""`python -m swd_jax.cli.verify` and `python -m swd_jax.convert` on a tiny saved SD3.5 pipeline folder."""
import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from swd_jax.cli.convert import main as convert_main
from swd_jax.cli.verify import main as verify_main, verify
from swd_jax.convert.converted import load_converted
from swd_jax.convert.converted import load_diffusers
from tests.torch_reference import tiny_sd3_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(sizes=(8,), batch=2, text_tokens=7, verbose=False)  # one latent size: one compile for all calls


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A pipeline folder (model_index.json + transformer/) and two adapters of random non-zero LoRA factors."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    root = tmp_path_factory.mktemp("verify")
    model = tiny_sd3_transformer("sd35_medium", num_layers=2)
    model.save_pretrained(root / "pipe" / "transformer")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    peft_cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])
    peft_model = get_peft_model(copy.deepcopy(model), peft_cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn_like(prm) * prm.shape[1] ** -0.5)
    peft_model.save_pretrained(root / "peft")
    StableDiffusion3Pipeline.save_lora_weights(
        root / "diffusers", transformer_lora_layers=get_peft_model_state_dict(peft_model.base_model.model),
        transformer_lora_adapter_metadata=peft_cfg.to_dict())
    return str(root / "pipe"), str(root / "peft"), str(root / "diffusers" / "pytorch_lora_weights.safetensors")


def _bump_block1(params):
    """+1e-2 on one weight of block 1: blocks before it must still match, block 1 and the output must not."""
    params = jax.tree.map(lambda x: x, params)
    q = params["transformer_blocks_1"]["attn"]["to_q"]
    q["kernel"] = q["kernel"].at[0, 0].add(1e-2)
    return params


def test_verify_passes_and_localises_a_perturbed_weight(pipeline):
    folder, peft_dir, _ = pipeline
    good = verify(folder, lora=peft_dir, **FAST)
    assert good["ok"] and good["tol"] == 1e-5
    assert max(rel for _, rel in good["errors"][8].values()) < 1e-5
    assert set(good["errors"][8]) == {"output", "block 0", "block 1"}
    bad = verify(folder, lora=peft_dir, perturb=_bump_block1, **FAST)
    errs = bad["errors"][8]
    assert not bad["ok"]
    assert errs["block 0"][1] < 1e-5 < min(errs["block 1"][1], errs["output"][1])
    assert verify_main([folder, "--lora", peft_dir, "--sizes", "8", "--text-tokens", "7", "--tol", "1e-12"]) == 1


def test_verify_cli_exits_zero(pipeline):
    folder, _, diffusers_file = pipeline
    proc = subprocess.run([sys.executable, "-m", "swd_jax.cli.verify", folder, "--lora", diffusers_file, "--sizes", "8",
                           "--batch", "2", "--text-tokens", "7"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "block 1" in proc.stdout and proc.stdout.strip().endswith("PASS")


def test_convert_cli_round_trip(pipeline, tmp_path):
    folder, _, _ = pipeline
    for dtype in ("float32", "bfloat16"):
        dst = str(tmp_path / dtype)
        assert convert_main([folder, dst, "--dtype", dtype, "--no-progress"]) == 0
        cfg, params = load_converted(dst)
        want_cfg, want = load_diffusers(os.path.join(folder, "transformer"), dtype=dtype)
        assert cfg == want_cfg
        assert jax.tree.structure(params) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert convert_main([folder, str(tmp_path / "float32"), "--no-progress"]) == 2  # exists, no --overwrite
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "x"), "--no-progress"]) == 2
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_converted(str(tmp_path / "x"))


def test_verify_a_converted_checkpoint_against_its_source(pipeline, tmp_path):
    """What training reads: the converted checkpoint, compared with the diffusers folder conversion.json names."""
    folder, peft_dir, _ = pipeline
    dst = str(tmp_path / "conv")
    assert convert_main([folder, dst, "--no-progress"]) == 0
    good = verify(dst, lora=peft_dir, **FAST)
    assert good["ok"] and set(good["errors"][8]) == {"output", "block 0", "block 1"}
    _, params = load_converted(dst)  # a checkpoint whose weights differ from its source must fail
    from swd_jax.convert.orbax_params import save_params
    save_params(os.path.join(dst, "params"), _bump_block1(params), overwrite=True)
    assert not verify(dst, **FAST)["ok"]
    with pytest.raises(ValueError, match="--reference is for a converted checkpoint"):
        verify(folder, reference=folder, **FAST)
