"""FLUX generation (swd_jax.pipeline / swd_jax.generate) vs diffusers, on a tiny random FLUX-dev pipeline folder.

- scale-wise with a random PEFT LoRA, end to end through `SwDPipeline.generate` (FLUX prompt encoding, seeds ->
  noise, the sampler, the FLUX VAE): == diffusers' FluxPipeline.encode_prompt, the torch loop of test_flux_lora
  over the PEFT-wrapped FluxTransformer2DModel (same noise, bicubic upscale, re-noise, guidance embedded) and
  diffusers' AutoencoderKL decode + VaeImageProcessor;
- the defaults: flux_4, guidance 4.5 through the embedding, 512 T5 tokens; schnell takes no guidance;
- the command line on a FLUX folder: PNGs + images.json.
"""
import copy
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from swd_jax.models.flux import FluxConfig
from tests.flux_reference import tiny_flux_transformer
from tests.test_flux_lora import LORA, torch_scale_wise
from tests.test_flux_prompt_encoding import flux  # noqa: F401  (module-scoped fixture: the FLUX folder)
from tests.torch_reference import rel_err

PROMPTS = ["a low tower", "the red tower"]
SCALES = (8, 10, 12, 16)  # tiny stand-ins for flux_4's 64 80 96 128
TINY = {"in_channels": 64, "joint_attention_dim": 32, "pooled_projection_dim": 16}  # the fixture's VAE, encoders


@pytest.fixture(scope="module")
def model(flux, tmp_path_factory):  # noqa: F811
    """(root, diffusers FluxPipeline text side, torch transformer, our LoRA factors, PEFT adapter folder)."""
    import jax.numpy as jnp

    from swd_jax.convert.peft_lora import export_peft, init_lora
    pipe, root = flux
    transformer = tiny_flux_transformer(True, seed=2, **TINY)  # FLUX-dev: a guidance embedding
    transformer.save_pretrained(str(root / "transformer"), safe_serialization=True)
    cfg = FluxConfig.from_folder(str(root / "transformer"))
    rng = np.random.default_rng(1)
    factors = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)) if p[-1].key == "lora_B" else x,
        init_lora(cfg, LORA, jax.random.key(0)))
    adapter = tmp_path_factory.mktemp("flux_swd_adapter")
    export_peft(factors, LORA, str(adapter), cfg=cfg)
    return root, pipe, transformer, factors, adapter


@pytest.fixture(scope="module")
def ours(model):
    from swd_jax.pipeline import SwDPipeline
    root, *_, adapter = model
    return SwDPipeline.from_pretrained(str(root), lora=str(adapter), devices=jax.devices()[:2])


def test_defaults_flux_4_embedded_guidance_512_tokens(ours):
    from swd_jax.schedule import get_schedule
    s = ours.sampler()
    flux_4 = get_schedule("flux_4")
    assert (s.scales, s.sigmas) == (flux_4.scales, tuple(float(x) for x in flux_4.sampling_sigmas))
    assert (s.guidance_scale, s.embedded_guidance) == (1.0, 4.5)
    assert ours.sampler(guidance_scale=3.0).embedded_guidance == 3.0
    assert ours.encoder.max_sequence_length == 512 and ours.settings(s)["max_sequence_length"] == 512
    with pytest.raises(ValueError, match="for FLUX use scale_wise or full_resolution"):
        ours.sampler("teacher")
    with pytest.raises(ValueError, match=r"divisible by patch_size=2, got \(8, 11\)"):
        ours.sampler("scale_wise", ((8, 11), (1.0, 0.5, 0.0)))
    schnell = copy.copy(ours)
    schnell.cfg = FluxConfig(in_channels=64, guidance_embeds=False)
    assert schnell.sampler().embedded_guidance is None
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell.sampler(guidance_scale=4.5)


def test_generate_matches_diffusers_loop_and_vae(model, ours):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from peft import PeftModel

    from swd_jax.pipeline import _draw_noise
    from swd_jax.sampler import SamplerNoise
    from swd_jax.schedule import get_schedule
    root, pipe, transformer, _, adapter = model
    sigmas = get_schedule("flux_4").sampling_sigmas
    sampler = ours.sampler("scale_wise", (SCALES, sigmas))  # embedded guidance: the default 4.5
    seed = 3
    images = ours.generate(PROMPTS, sampler, seed=seed)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8

    drawn = _draw_noise(np.array([seed, seed + 1], np.uint32), tuple((s, s, 16) for s in SCALES))
    noise = SamplerNoise(np.array(drawn[0]), tuple(np.array(d) for d in drawn[1:]))  # writable, for torch
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
    cond = {"context": embeds.numpy(), "pooled": pooled.numpy(), "guidance": np.full((2,), 4.5, np.float32)}
    torch_model = PeftModel.from_pretrained(copy.deepcopy(transformer), str(adapter)).eval().base_model.model
    want = torch_scale_wise(torch_model, cond, SCALES, sigmas, noise)
    latents = ours.sample_latents(ours.encode(PROMPTS), [seed, seed + 1], sampler)
    assert rel_err(latents, want) < 1e-5, rel_err(latents, want)
    base = ours.sample_latents(ours.encode(PROMPTS), [seed, seed + 1], dataclasses.replace(sampler, embedded_guidance=1.0))
    assert rel_err(base, latents) > 0.01  # the embedded guidance matters

    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    with torch.no_grad():
        z = torch.from_numpy(want).permute(0, 3, 1, 2) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z).sample
    ref = np.round(VaeImageProcessor().postprocess(img, output_type="np") * 255).astype(np.uint8)
    assert np.abs(images.astype(int) - ref).max() <= 1


def test_cli_writes_pngs_and_index(model, tmp_path):
    from PIL import Image

    from swd_jax.generate import main
    root, *_, adapter = model
    out = tmp_path / "out"
    rc = main(["--model", str(root), "--lora", str(adapter), "--prompt", "a low tower", "--prompt", "red",
               "--scales", "8,10", "--sigmas", "1,0.8956,0", "--guidance", "3.5", "--max-sequence-length", "16",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    records = json.loads((out / "images.json").read_text())
    assert [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert records[0]["embedded_guidance"] == 3.5 and records[0]["guidance_scale"] == 1.0
    assert records[0]["scales"] == [8, 10] and records[0]["max_sequence_length"] == 16
    assert records[0]["lora"] == str(adapter) and records[0]["transformer"] == str(root / "transformer")
    assert np.asarray(Image.open(out / "00001.png")).shape == (20, 20, 3)
    assert main(["--model", str(root), "--prompt", "x", "--out", str(out), "--sampler", "teacher"]) == 2
