"""Generation (swd_jax.pipeline / swd_jax.cli.generate) and the diffusers LoRA export vs diffusers, tiny random SD3.

- scale-wise: our SwDPipeline with a PEFT adapter == diffusers' StableDiffusion3Pipeline + FlowMatchLCMScheduler
  scale factors (bicubic) with our exported pytorch_lora_weights.safetensors loaded by `load_lora_weights`,
  on the same noise (the README's PyTorch recipe, run as written there);
- teacher: our Euler + CFG == StableDiffusion3Pipeline's default FlowMatchEulerDiscreteScheduler + CFG;
- export: `load_lora_weights` changes diffusers' transformer output exactly as the LoRA changes ours;
- the command line on a run workdir: PNGs, grid, images.json, the run's schedule.
"""
import copy
import json

import numpy as np
import pytest
import torch

from tests.test_prompt_encoding import T5_LEN, _save, rel_err, sd3  # noqa: F401  (module-scoped fixture)

SCALES, SIGMAS = (4, 6, 8), (1.0, 0.9, 0.75, 0.0)
PROMPTS = ["a low tower", "the red tower"]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out")  # with the text stream


@pytest.fixture(scope="module")
def model(sd3, tmp_path_factory):  # noqa: F811
    """(root folder, text components, torch transformer, torch VAE, our LoRA config and factors, adapter folder)."""
    import jax
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from swd_jax.convert.peft_lora import export_diffusers_lora, export_peft, init_lora
    from swd_jax.models.layers import LoraConfig
    from swd_jax.models.mmdit import MMDiTConfig

    pipe, root = sd3
    torch.manual_seed(1)
    transformer = _save(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), root / "transformer")
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    cfg = MMDiTConfig.from_folder(str(root / "transformer"))
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    factors = init_lora(cfg, lora, jax.random.key(0))
    factors = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "lora_B" in str(p[-1]) else x,
        factors)
    adapter = tmp_path_factory.mktemp("student_peft")
    export_peft(factors, lora, str(adapter), cfg=cfg)  # as the trainer's _export: both files, one folder
    export_diffusers_lora(factors, lora, str(adapter), cfg=cfg)
    text = {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                          "tokenizer_2", "tokenizer_3")}
    return root, text, transformer, vae, lora, factors, adapter


@pytest.fixture(scope="module")
def ours(model):
    import jax

    from swd_jax.pipeline import SwDPipeline
    root, *_, adapter = model
    return SwDPipeline.from_pretrained(str(root), lora=str(adapter), max_sequence_length=T5_LEN,
                                       devices=jax.devices()[:2])


def _torch_pipe(model, scheduler):
    from diffusers import StableDiffusion3Pipeline
    _, text, transformer, vae, *_ = model
    return StableDiffusion3Pipeline(transformer=copy.deepcopy(transformer), vae=vae, scheduler=scheduler, **text)


def _nhwc(x):
    return np.asarray(x.permute(0, 2, 3, 1).numpy())


def test_diffusers_lora_export_changes_output_as_ours(model):
    """pipe.load_lora_weights(student_peft) reads our pytorch_lora_weights.safetensors: same change as our LoRA."""
    import jax.numpy as jnp
    from diffusers import FlowMatchEulerDiscreteScheduler

    from swd_jax.convert.converted import load_diffusers
    from swd_jax.models.mmdit import MMDiT
    root, _, _, _, lora, factors, adapter = model
    pipe = _torch_pipe(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    t = np.array([900.0, 300.0], np.float32)
    ctx = rng.standard_normal((2, 5, 64), dtype=np.float32)
    pooled = rng.standard_normal((2, 40), dtype=np.float32)
    run = lambda m: m(torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(pooled),
                      torch.from_numpy(t)).sample.detach().numpy()
    with torch.no_grad():
        torch_base = run(pipe.transformer)
        pipe.load_lora_weights(str(adapter))
        torch_lora = run(pipe.transformer)
    cfg, base = load_diffusers(str(root / "transformer"))
    m = MMDiT(cfg, lora=lora)
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(pooled))
    ours_base = np.asarray(m.apply({"params": base}, *args)).transpose(0, 3, 1, 2)
    ours_lora = np.asarray(m.apply({"params": base, "lora": factors}, *args)).transpose(0, 3, 1, 2)
    assert rel_err(torch_lora - torch_base, torch_base) > 0.05  # the LoRA matters
    assert rel_err(ours_lora - ours_base, torch_lora - torch_base) < 1e-5
    assert rel_err(ours_lora, torch_lora) < 1e-5


def readme_recipe(pipe, adapter, prompts, scales, sigmas, generator, latents):
    """The README's PyTorch recipe for the exported student (the hub folder and prompt replaced by the test's)."""
    from diffusers import FlowMatchLCMScheduler
    pipe.load_lora_weights(adapter)  # student_peft/pytorch_lora_weights.safetensors
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0)
    pipe.scheduler.set_scale_factors([s / scales[0] for s in scales[1:]], upscale_mode="bicubic")
    f = pipe.vae_scale_factor  # 8 for SD3
    return pipe(prompts, sigmas=list(sigmas), height=f * scales[0], width=f * scales[0], guidance_scale=1.0,
                generator=generator, latents=latents, output_type="latent", max_sequence_length=T5_LEN).images


def test_scale_wise_matches_diffusers_lcm_scale_factors(model, ours, monkeypatch):
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm
    import jax.numpy as jnp
    from diffusers import FlowMatchEulerDiscreteScheduler

    from swd_jax.models.vae import decode_latents
    from swd_jax.method.sampler import SamplerNoise
    drawn = []
    draw = lcm.randn_tensor
    monkeypatch.setattr(lcm, "randn_tensor", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    pipe = _torch_pipe(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(0)
    init = torch.randn(2, 4, SCALES[0], SCALES[0], generator=g)
    with torch.no_grad():
        torch_latents = readme_recipe(pipe, str(model[-1]), PROMPTS, SCALES, SIGMAS[:-1], g, init)
        vae = pipe.vae
        torch_img = vae.decode(torch_latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert [tuple(d.shape[2:]) for d in drawn] == [(6, 6), (8, 8), (8, 8)]  # the last is multiplied by sigma 0

    sampler = ours.sampler("scale_wise", (SCALES, SIGMAS))
    noise = SamplerNoise(jnp.asarray(_nhwc(init)), tuple(jnp.asarray(_nhwc(d)) for d in drawn[:2]))
    latents = ours.sample_latents(ours.encode(PROMPTS), [0, 1], sampler, noise=noise)
    assert rel_err(latents, _nhwc(torch_latents)) < 1e-5
    img = decode_latents(ours.vae, ours.vae_params, latents)
    assert rel_err(img, _nhwc(torch_img)) < 1e-5
    want = np.round(pipe.image_processor.postprocess(torch_img, output_type="np") * 255).astype(np.uint8)
    assert np.abs(ours.decode(latents).astype(int) - want).max() <= 1


def test_teacher_matches_diffusers_euler_cfg(model, ours):
    import jax.numpy as jnp
    from diffusers import FlowMatchEulerDiscreteScheduler

    from swd_jax.method.sampler import SamplerNoise
    pipe = _torch_pipe(model, FlowMatchEulerDiscreteScheduler(shift=3.0))  # the teacher: no LoRA
    g = torch.Generator().manual_seed(1)
    init = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        want = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, height=16, width=16, latents=init,
                    output_type="latent", max_sequence_length=T5_LEN).images
    sampler = ours.sampler("teacher", steps=6, guidance_scale=3.0, size=8)
    got = ours.sample_latents(ours.encode(PROMPTS), [0, 1], sampler, noise=SamplerNoise(jnp.asarray(_nhwc(init))))
    assert rel_err(got, _nhwc(want)) < 1e-5


def test_cli_on_run_workdir(model, tmp_path):
    """A run's workdir as --lora: its latest checkpointed student and its schedule; PNGs, grid and images.json."""
    import jax
    from PIL import Image

    from configs import tiny
    from swd_jax.convert.converted import convert
    from swd_jax.eval.prompts import read_index
    from swd_jax.cli.generate import main
    from swd_jax.models.mmdit import MMDiTConfig
    from swd_jax.pipeline import load_student
    from swd_jax.train.checkpoint import Checkpointer
    root, _, _, _, lora, factors, _ = model
    run = tmp_path / "run"
    c = tiny.get_config()
    c.schedule.scales, c.schedule.boundaries = (4, 8), (0, 14, 28)
    c.lora.rank, c.lora.alpha, c.lora.targets = lora.rank, lora.alpha, lora.targets
    run.mkdir()
    (run / "config.json").write_text(c.to_json_best_effort(indent=2))
    zeros = jax.tree.map(lambda x: 0 * x, factors)
    with Checkpointer(str(run / "checkpoints"), save_every=1, keep=2) as ck:
        ck.save(1, {"student": zeros, "fake": factors, "step": np.int32(1)}, {"step": 1})
        ck.save(2, {"student": factors, "fake": zeros, "step": np.int32(2)}, {"step": 2})
    cfg = MMDiTConfig.from_folder(str(root / "transformer"))
    student = load_student(str(run), cfg)
    assert student.schedule.scales == (4, 8) and student.source.endswith("/2/state")
    np.testing.assert_array_equal(jax.tree.leaves(student.params)[0], jax.tree.leaves(factors)[0])

    out = tmp_path / "out"
    (tmp_path / "p.csv").write_text('caption,x\n"a low tower",1\n"the red tower",2\n')
    convert(str(root / "transformer"), str(tmp_path / "conv"), progress=False)  # our converted params instead
    rc = main(["--model", str(root), "--converted", str(tmp_path / "conv"), "--lora", str(run),
               "--prompts", str(tmp_path / "p.csv"), "--prompt", "low",
               "--num-per-prompt", "2", "--batch", "4", "--seed", "5", "--out", str(out),
               "--max-sequence-length", str(T5_LEN), "--no-progress"])
    assert rc == 0
    records = json.loads((out / "images.json").read_text())
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(6)]
    assert [r["seed"] for r in records] == list(range(5, 11))
    assert [r["prompt"] for r in records] == ["low", "low", "a low tower", "a low tower", "the red tower",
                                              "the red tower"]
    assert records[0]["scales"] == [4, 8] and records[0]["sampler"] == "scale_wise"
    assert records[0]["lora"].endswith("/2/state") and records[0]["transformer"] == str(tmp_path / "conv")
    assert len(read_index(str(out))) == 6  # what `python -m swd_jax.cli.evaluate --images OUT` reads
    img = np.asarray(Image.open(out / "00000.png"))
    assert img.shape == (16, 16, 3) and (out / "grid.png").exists()
    assert not np.array_equal(img, np.asarray(Image.open(out / "00001.png")))  # own seed per image
    assert main(["--model", str(root), "--prompt", "x", "--out", str(out), "--scales", "4,8"]) == 2  # no traceback


def _tb_images(folder) -> list[tuple[int, str, bytes]]:
    """(step, tag, encoded image) of every image summary in the TensorBoard event files under `folder`."""
    import struct

    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: uint64 length, uint32 crc, payload, uint32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            out += [(event.step, v.tag, v.image.encoded_image_string) for v in event.summary.value
                    if v.HasField("image")]
    return out


def test_validation_finds_vae_of_converted_source_and_logs_grid(tmp_path):
    """Validation decodes with the vae/ of the pipeline a converted checkpoint came from; grids go to TensorBoard."""
    import io

    from PIL import Image

    from swd_jax.train.loop import MetricsWriter
    from swd_jax.image_files import image_grid
    from swd_jax.train.validation import source_vae_folder
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "conversion.json").write_text(json.dumps({"source": str(tmp_path / "pipe" / "transformer")}))
    assert source_vae_folder("converted", str(tmp_path / "conv")) is None  # no vae/ there yet
    (tmp_path / "pipe" / "vae").mkdir()
    assert source_vae_folder("converted", str(tmp_path / "conv")) == str(tmp_path / "pipe" / "vae")
    assert source_vae_folder("auto", str(tmp_path / "conv")) == str(tmp_path / "pipe" / "vae")
    assert source_vae_folder("diffusers", str(tmp_path / "pipe")) == str(tmp_path / "pipe" / "vae")
    assert source_vae_folder("random", "") is None

    grid = image_grid(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)))
    writer = MetricsWriter(str(tmp_path / "run"))
    writer.image("samples", grid, 7)
    writer.close()
    [(step, tag, png)] = _tb_images(tmp_path / "run")
    assert (step, tag) == (7, "samples")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), grid)
