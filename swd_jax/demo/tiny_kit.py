"""`swd-tiny-kit DIR`: tiny random stand-ins for everything the README journey reads, so it runs on any machine.

    swd-tiny-kit kit    # kit/pipeline, kit/data, kit/metrics/{inception.npz, clip/, pickscore/}; needs torch

- `DIR/pipeline`: a diffusers StableDiffusion3Pipeline folder, SD3.5-Medium-shaped and random (2 MMDiT blocks,
  dual attention in block 0, RMS qk-norm; CLIP-L/G and T5 encoders of 2 layers with byte-level BPE / Unigram
  vocabularies of a few words; a 2-block VAE, latent 4 channels, 2x downsampling). Every component is saved by
  diffusers/transformers themselves, so the journey's `swd-verify` compares against what diffusers loads.
- `DIR/data`: 16x16 random PNGs and `metainfo.csv` (`file_name,prompt`), the layout swd-precompute reads.
- `DIR/metrics`: random FID-Inception weights under pytorch-fid's keys (`inception.npz`, for `--inception`), and
  two tiny transformers `CLIPModel` folders with a letters-only tokenizer and a 32 px preprocessor (`clip/`,
  `pickscore/`, for `--clip` and `--pickscore`).

The tests build their tiny models with these functions too (tests/test_prompt_encoding.py's `sd3` fixture,
tests/test_readme_journey.py, tests/test_evaluate.py). The numbers such models give mean nothing; the kit is for
running the commands, not for judging results.
"""
from __future__ import annotations

import json
import os
import string

import numpy as np

CHARS = "abcdefghijklmnopqrstuvwxyz"
CLIP_VOCAB = (["!"] + list(CHARS) + [c + "</w>" for c in CHARS]
              + ["lo", "low</w>", "er</w>", "to", "wer</w>", "<|startoftext|>", "<|endoftext|>"])
CLIP_MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("t", "o"), ("w", "er</w>")]
T5_PIECES = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
             + [("▁" + w, -2.0 - 0.1 * i) for i, w in enumerate(["a", "low", "tower", "lower", "the", "red"])]
             + [(c, -5.0) for c in CHARS])
TINY_VAE = dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
TINY_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
    pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
PROMPTS = ("a low tower", "the red tower", "")  # the data's prompts, in turn (an empty one: the unconditional)


def perturbed_save(model, folder):
    """Add 0.05 N(0, 1) to every parameter (zero-initialised ones included), then `save_pretrained(folder)`."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def sd3_components(root) -> dict:
    """Tiny random SD3 text encoders, tokenizers and VAE saved under `root`, plus a transformer config.json.

    Returns the components (models and tokenizers) for `StableDiffusion3Pipeline(transformer=None, ...)`.
    """
    import torch
    import transformers
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    root = os.fspath(root)
    vocab = {t: i for i, t in enumerate(CLIP_VOCAB)}
    eot = vocab["<|endoftext|>"]
    clip = lambda h, act, eos: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(  # noqa: E731
        vocab_size=len(vocab), hidden_size=h, intermediate_size=2 * h, projection_dim=h, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=eos))
    comps = dict(
        # CLIP-L: quick-GELU, legacy eos_token_id=2 (pooled at the highest id); CLIP-G: GELU, pooled at the EOT id
        text_encoder=perturbed_save(clip(16, "quick_gelu", 2), os.path.join(root, "text_encoder")),
        text_encoder_2=perturbed_save(clip(24, "gelu", eot), os.path.join(root, "text_encoder_2")),
        text_encoder_3=perturbed_save(transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(T5_PIECES), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu")),
            os.path.join(root, "text_encoder_3")),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES, model_max_length=77, pad_token="!"),
        tokenizer_3=transformers.T5TokenizerFast(vocab=T5_PIECES, extra_ids=0))
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        comps[name].save_pretrained(os.path.join(root, name))
    os.makedirs(os.path.join(root, "transformer"), exist_ok=True)
    with open(os.path.join(root, "transformer", "config.json"), "w") as f:
        json.dump({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 64, "pooled_projection_dim": 40}, f)
    perturbed_save(AutoencoderKL(**TINY_VAE), os.path.join(root, "vae"))
    return comps


def complete_pipeline(root) -> None:
    """The folder of `sd3_components` made a whole pipeline: model_index.json and a random transformer."""
    import torch
    from diffusers import SD3Transformer2DModel
    root = os.fspath(root)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
    torch.manual_seed(0)
    perturbed_save(SD3Transformer2DModel(**TINY_TRANSFORMER), os.path.join(root, "transformer"))


def write_images(folder, n: int, bad: int | None = None):
    """`n` random 16x16 PNGs and metainfo.csv (file_name,prompt) in a new `folder`; `bad`: that one undecodable."""
    from PIL import Image
    rng = np.random.default_rng(0)
    path = os.fspath(folder)
    os.makedirs(path)
    lines = ["file_name,prompt"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
        lines.append(f"{i}.png,{PROMPTS[i % len(PROMPTS)]}")
    if bad is not None:
        with open(os.path.join(path, f"{bad}.png"), "wb") as f:
            f.write(b"not a png")
    with open(os.path.join(path, "metainfo.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder


def clip_folder(path, seed: int):
    """A tiny CLIPModel (77 positions, as the scorer pads to 77) + a letters-only CLIP tokenizer + a 32 px
    preprocessor config, saved in `path`; returns the torch model."""
    import torch
    import transformers
    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    path = os.fspath(path)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="gelu"), projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3}, f)
    return model


def random_inception_npz(path) -> None:
    """Random FID-Inception weights under pytorch-fid's state-dict keys (no torch needed), as an .npz."""
    import jax
    from flax import traverse_util

    from swd_jax.models.inception import FIDInceptionV3
    abstract = jax.eval_shape(lambda x: FIDInceptionV3().init(jax.random.key(0), x),
                              jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32))["params"]
    rng = np.random.default_rng(0)
    arrays = {}
    for p, leaf in traverse_util.flatten_dict(abstract).items():
        *mods, name = p
        if name == "kernel":  # [kh, kw, in, out] -> torch [out, in, kh, kw]
            w = rng.normal(size=leaf.shape) * (2.0 / np.prod(leaf.shape[:3])) ** 0.5
            arrays[".".join(mods) + ".weight"] = w.transpose(3, 2, 0, 1).astype(np.float32)
        else:
            torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
            v = 0.5 + rng.uniform(size=leaf.shape) if name in ("scale", "var") else 0.1 * rng.normal(size=leaf.shape)
            arrays[".".join(mods) + "." + torch_name] = v.astype(np.float32)
    arrays["fc.weight"], arrays["fc.bias"] = np.zeros((1008, 2048), np.float32), np.zeros(1008, np.float32)
    np.savez(os.fspath(path), **arrays)


KIT_MARK = "tiny_kit.json"


def write_kit(folder: str, num_images: int = 8, quiet: bool = True) -> dict[str, str]:
    """pipeline/, data/ and metrics/ under `folder` (new, empty, or an earlier kit, which is replaced).

    `quiet`: transformers/diffusers print no notes about the toy configs and no "Writing model shards" bars.
    """
    import shutil
    try:
        import torch  # noqa: F401  (first: transformers/diffusers would print their own notes without it)
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"swd-tiny-kit writes diffusers/transformers folders and needs torch, diffusers and "
                         f"transformers ({e}); install them: pip install -r requirements-torch.txt") from None
    if quiet:
        _quiet_hugging_face()
    if num_images < 1:
        raise ValueError(f"--images must be a positive integer, got {num_images}")
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.exists(os.path.join(folder, KIT_MARK)):
            raise FileExistsError(f"{folder} exists and is not empty (and holds no earlier kit): give a new folder")
        shutil.rmtree(folder)
    elif os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} is a file")
    paths = {name: os.path.join(folder, name) for name in ("pipeline", "data")}
    paths.update({"inception": os.path.join(folder, "metrics", "inception.npz"),
                  "clip": os.path.join(folder, "metrics", "clip"),
                  "pickscore": os.path.join(folder, "metrics", "pickscore")})
    sd3_components(paths["pipeline"])
    complete_pipeline(paths["pipeline"])
    write_images(paths["data"], num_images)
    os.makedirs(os.path.join(folder, "metrics"), exist_ok=True)
    random_inception_npz(paths["inception"])
    clip_folder(paths["clip"], seed=0)
    clip_folder(paths["pickscore"], seed=1)
    with open(os.path.join(folder, KIT_MARK), "w") as f:  # written last: marks a complete kit
        json.dump({"written_by": "swd-tiny-kit", "num_images": num_images, **paths}, f, indent=1)
    return paths


def _quiet_hugging_face() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
