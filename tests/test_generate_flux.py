"""FLUX generation (swd_jax.pipeline / swd_jax.cli.generate) vs diffusers, on a tiny random FLUX-dev pipeline folder.

- scale-wise with a random PEFT LoRA, end to end through `SwDPipeline.generate` (FLUX prompt encoding, seeds ->
  noise, the sampler, the FLUX VAE): == diffusers' FluxPipeline.encode_prompt, the torch loop of test_flux_lora
  over the PEFT-wrapped FluxTransformer2DModel (same noise, bicubic upscale, re-noise, guidance embedded) and
  diffusers' AutoencoderKL decode + VaeImageProcessor;
- the defaults: flux_4, guidance 4.5 through the embedding, 512 T5 tokens; schnell takes no guidance;
- the FLUX teacher: our sigmas == FlowMatchEulerDiscreteScheduler.set_timesteps as FluxPipeline calls it (dynamic
  shifting, mu from the latent size; a folder's own scheduler config), and its samples == diffusers' FluxPipeline
  itself (output_type="latent") given the same noise as latents;
- the command line on a FLUX folder: PNGs + images.json.
"""
import copy
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from swd_jax.method.schedule import flow_match_sigmas
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
    from swd_jax.method.schedule import get_schedule
    s = ours.sampler()
    flux_4 = get_schedule("flux_4")
    assert (s.scales, s.sigmas) == (flux_4.scales, tuple(float(x) for x in flux_4.sampling_sigmas))
    assert (s.guidance_scale, s.embedded_guidance) == (1.0, 4.5)
    assert ours.sampler(guidance_scale=3.0).embedded_guidance == 3.0
    assert ours.encoder.max_sequence_length == 512 and ours.settings(s)["max_sequence_length"] == 512
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
    from swd_jax.method.sampler import SamplerNoise
    from swd_jax.method.schedule import get_schedule
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

    from swd_jax.cli.generate import main
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
    assert main(["--model", str(root), "--prompt", "x", "--out", str(out), "--sampler", "teacher", "--steps", "0"]) == 2


FLUX_DEV_SCHEDULER_JSON = {  # FLUX.1-dev's scheduler/scheduler_config.json, as published
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True}
SCHNELL_SCHEDULER_JSON = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 1.0, "use_dynamic_shifting": False}


def diffusers_flux_sigmas(config: dict, steps: int, latent_size: int):
    """(sigmas, timesteps) as FluxPipeline.__call__ sets its scheduler up for a latent_size^2 latent."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import (
        calculate_shift,
        retrieve_timesteps,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = scheduler.config
    mu = calculate_shift((latent_size // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.numpy(), timesteps.numpy()


@pytest.mark.parametrize("steps, latent_size", [(28, 128), (28, 96), (6, 12)])
def test_flux_teacher_sigmas_match_flux_pipeline(steps, latent_size):
    from swd_jax.method.schedule import FLUX_DEV_SCHEDULER, flux_dynamic_sigmas
    want, want_t = diffusers_flux_sigmas(FLUX_DEV_SCHEDULER_JSON, steps, latent_size)
    ours = flux_dynamic_sigmas(steps, (latent_size // 2) ** 2)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, want)  # bit for bit (the brief asks 1e-6)
    np.testing.assert_array_equal(ours[:-1] * np.float32(1000), want_t)  # the scheduler's timesteps, bit for bit
    assert flux_dynamic_sigmas(steps, (latent_size // 2) ** 2, FLUX_DEV_SCHEDULER_JSON).tolist() == ours.tolist()
    assert {k: FLUX_DEV_SCHEDULER_JSON[k] for k in FLUX_DEV_SCHEDULER} == FLUX_DEV_SCHEDULER
    static, _ = diffusers_flux_sigmas(SCHNELL_SCHEDULER_JSON, steps, latent_size)  # schnell: shift 1, no dynamics
    np.testing.assert_allclose(flux_dynamic_sigmas(steps, 1, SCHNELL_SCHEDULER_JSON), static, rtol=0, atol=1e-6)


def test_flux_teacher_settings_and_scheduler_config(ours, tmp_path):
    from swd_jax.method.schedule import flux_dynamic_sigmas
    s = ours.sampler("teacher")  # FluxPipeline's defaults: 28 steps at 1024 px, embedded guidance 3.5, no CFG
    assert (s.scales, s.guidance_scale, s.embedded_guidance) == ((128,), 1.0, 3.5)
    np.testing.assert_array_equal(s.sigmas, diffusers_flux_sigmas(FLUX_DEV_SCHEDULER_JSON, 28, 128)[0])
    assert ours.sampler("teacher", guidance_scale=2.0, steps=4, size=12).embedded_guidance == 2.0
    record = ours.settings(s)
    assert record["scheduler"] == "FLUX.1-dev defaults" and record["lora"] is None
    assert (record["sampler"], record["embedded_guidance"], len(record["sigmas"])) == ("teacher", 3.5, 29)

    own = copy.copy(ours)  # a folder with its own scheduler config (schnell's static shift 1)
    own.model_folder = str(tmp_path)
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(SCHNELL_SCHEDULER_JSON))
    s = own.sampler("teacher", steps=4, size=12)
    np.testing.assert_array_equal(s.sigmas, flux_dynamic_sigmas(4, 36, SCHNELL_SCHEDULER_JSON))
    assert s.sigmas[:4] == tuple(float(x) for x in np.linspace(1, 0.25, 4, dtype=np.float32))
    assert own.settings(s)["scheduler"] == str(path)
    path.write_text(json.dumps({**FLUX_DEV_SCHEDULER_JSON, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=f"^{path}: scheduler config use_karras_sigmas=True is not supported"):
        own.sampler("teacher")
    path.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="needs FlowMatchEulerDiscreteScheduler"):
        own.sampler("teacher")


def test_flux_teacher_matches_flux_pipeline(model, ours):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from swd_jax.pipeline import _draw_noise
    from tests.flux_reference import pack, unpack
    _, text_side, transformer, *_ = model
    steps, size, seeds = 6, 12, [5, 6]
    sampler = ours.sampler("teacher", steps=steps, size=size)  # embedded guidance: the teacher's default 3.5
    latents = np.asarray(ours.sample_latents(ours.encode(PROMPTS), seeds, sampler))

    noise = np.array(_draw_noise(np.array(seeds, np.uint32), ((size, size, 16),))[0])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER_JSON), vae=None,
                        text_encoder=text_side.text_encoder, tokenizer=text_side.tokenizer,
                        text_encoder_2=text_side.text_encoder_2, tokenizer_2=text_side.tokenizer_2,
                        transformer=transformer)
    assert pipe.vae_scale_factor == 8  # no VAE: height = 8 * latent size
    with torch.no_grad():
        out = pipe(PROMPTS, height=8 * size, width=8 * size, num_inference_steps=steps, guidance_scale=3.5,
                   latents=pack(torch.from_numpy(noise)), output_type="latent", max_sequence_length=512).images
    want = unpack(out, size, size).numpy()
    assert rel_err(latents, want) < 1e-5, rel_err(latents, want)
    shift3 = dataclasses.replace(sampler, sigmas=tuple(float(x) for x in flow_match_sigmas(steps, 3.0)))
    assert rel_err(ours.sample_latents(ours.encode(PROMPTS), seeds, shift3), want) > 1e-3  # the sigmas matter
