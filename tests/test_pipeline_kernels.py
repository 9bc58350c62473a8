"""SwDPipeline's transformer options give the same latents and images: blocks under scan (weights and the LoRA
student stacked at load) == unrolled within 1e-6; "chunked" and "splash" (Pallas interpret mode, per device under
the pipeline's mesh) attention == XLA's within 1e-5. A tiny random SD3.5-like pipeline, 5 blocks (dual attention in
0-1, so two runs of 2 identical blocks scan), a PEFT student, 2 CPU devices."""
import numpy as np
import pytest

from tests.test_prompt_encoding import T5_LEN, _save, rel_err, sd3  # noqa: F401  (module-scoped fixture)

PROMPTS = ["a low tower", "the red tower"]
SCALES, SIGMAS = (4, 6, 8), (1.0, 0.9, 0.75, 0.0)


@pytest.fixture(scope="module")
def folders(sd3, tmp_path_factory):  # noqa: F811
    """(pipeline folder with a 5-block transformer, PEFT adapter folder)."""
    import json

    import jax
    import torch
    from diffusers import SD3Transformer2DModel

    from swd_jax.convert.peft_lora import export_peft, init_lora
    from swd_jax.models.layers import LoraConfig
    from swd_jax.models.mmdit import MMDiTConfig
    root = sd3[1]
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    torch.manual_seed(0)
    _save(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=5, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm"), root / "transformer")
    cfg = MMDiTConfig.from_folder(str(root / "transformer"))
    lora = LoraConfig(rank=4, alpha=8.0, targets=("to_q", "to_v", "net.2", "add_k_proj"))
    factors = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "lora_B" in str(p[-1]) else x,
        init_lora(cfg, lora, jax.random.key(0)))
    adapter = tmp_path_factory.mktemp("peft")
    export_peft(factors, lora, str(adapter), cfg=cfg)
    return str(root), str(adapter)


def _outputs(root, adapter, **kw):
    """(scale-wise latents, scale-wise images, teacher latents) of a pipeline built with `kw`."""
    import jax

    from swd_jax.pipeline import SwDPipeline
    pipe = SwDPipeline.from_pretrained(root, lora=adapter, max_sequence_length=T5_LEN, devices=jax.devices()[:2],
                                       **kw)
    student = pipe.sampler("scale_wise", (SCALES, SIGMAS))
    teacher = pipe.sampler("teacher", (SCALES, SIGMAS), steps=3, size=8)
    cond = pipe.encode(PROMPTS)
    latents = np.asarray(pipe.sample_latents(cond, [0, 1], student))
    teacher_latents = np.asarray(pipe.sample_latents(cond, [0, 1], teacher))
    return pipe, latents, pipe.decode(latents), teacher_latents


def test_scan_blocks_equals_unrolled(folders):
    unrolled, *want = _outputs(*folders, scan_blocks=False)
    scanned, *got = _outputs(*folders, scan_blocks=True)
    assert [g.size for g in scanned.block_groups] == [2, 2, 1]
    assert "transformer_blocks_0_to_1" in scanned.base and "transformer_blocks_0" not in scanned.base
    assert "transformer_blocks_2_to_3" in scanned.lora and "transformer_blocks_2" in unrolled.lora
    assert (unrolled.attention_impl, unrolled.scan_blocks) == ("xla", False)  # the CPU defaults
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[2], want[2]) < 1e-6
    assert np.abs(got[1].astype(int) - want[1].astype(int)).max() <= 1  # uint8 rounding of equal latents
    scanned.lora = unrolled.student.params  # assigned in the stored layout (as the trainer's evaluation does)
    assert "transformer_blocks_0_to_1" in scanned.lora


@pytest.mark.parametrize("attention", ["chunked", "splash"])
def test_attention_kernels_equal_xla(folders, attention, monkeypatch):
    from swd_jax.models import layers, splash
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 16)  # 16 image + 93 text tokens: 7 chunks, not one
    monkeypatch.setattr(splash, "INTERPRET", True)
    _, *want = _outputs(*folders, attention_impl="xla", scan_blocks=True)
    pipe, *got = _outputs(*folders, attention_impl=attention, scan_blocks=True)
    assert pipe.attention_impl == attention
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[2], want[2]) < 1e-5
    assert np.abs(got[1].astype(int) - want[1].astype(int)).max() <= 1


def test_attention_choice_is_checked(folders):
    from swd_jax.pipeline import SwDPipeline, resolve_attention
    assert resolve_attention("auto", "tpu") == "splash" and resolve_attention(None, "cpu") == "xla"
    with pytest.raises(ValueError, match="'splash' needs a TPU"):
        SwDPipeline.from_pretrained(folders[0], attention_impl="splash")
    with pytest.raises(ValueError, match="attention 'flash'; choose one of"):
        SwDPipeline.from_pretrained(folders[0], attention_impl="flash")
