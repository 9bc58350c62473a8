"""ms/image of `swd_jax.cli.generate` end to end (text encoders, sampler, VAE decode): scale-wise vs the teacher.

    python -m benchmarks.generate_speed --model FOLDER [--schedule sd35_medium_6] [--divide 2] [--images 4]

FOLDER is any diffusers SD3 pipeline folder (on CPU: a tiny random one, e.g. built by
`python -m benchmarks.generate_speed --build-tiny DIR`: the test suite's tiny text encoders and VAE with the
`benchmarks/tiny.py` SD3.5-Medium-shaped transformer, 4 latent channels, latents up to 128). `--divide N` divides
the schedule's latent sizes by N (same sigmas; the teacher runs 28 Euler steps with CFG 7 at the last size).
Each sampler first generates one batch (compiles), then `--images` more; steady-state ms/image and the ratio.
"""
from __future__ import annotations

import argparse
import time


def build_tiny(folder: str) -> None:
    """The tests' tiny SD3 text encoders, tokenizers and VAE plus a benchmarks/tiny.py-shaped transformer."""
    import pathlib

    import torch
    from diffusers import SD3Transformer2DModel

    from swd_jax.demo.tiny_kit import perturbed_save as _save, sd3_components

    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    sd3_components(folder)  # the tests' (and swd-tiny-kit's) encoders, tokenizers, vae/
    torch.manual_seed(0)
    _save(SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=64,
                                num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=192,
                                pooled_projection_dim=40, out_channels=4, pos_embed_max_size=64,
                                dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"),
          pathlib.Path(folder) / "transformer")


def measure(folder: str, schedule: str, images: int, batch: int, max_sequence_length: int,
            divide: int = 1) -> dict[str, float]:
    from swd_jax.pipeline import SwDPipeline
    from swd_jax.method.schedule import get_schedule

    pipe = SwDPipeline.from_pretrained(folder, max_sequence_length=max_sequence_length)
    preset = get_schedule(schedule)
    schedule = ([s // divide for s in preset.scales], [float(x) for x in preset.sampling_sigmas])
    out = {}
    for kind in ("scale_wise", "teacher"):
        sampler = pipe.sampler(kind, schedule)
        prompts = [f"a low tower {i}" for i in range(images + batch)]
        batches = pipe.generate_batches(prompts, sampler, batch_size=batch)
        next(batches)  # compiles
        t = time.perf_counter()
        n = sum(len(chunk) for chunk, _, _ in batches)
        out[kind] = 1e3 * (time.perf_counter() - t) / n
        print(f"{kind}: {sampler.to_json()} -> {out[kind]:.1f} ms/image", flush=True)
    print(f"teacher / scale-wise: {out['teacher'] / out['scale_wise']:.2f}x")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--build-tiny", metavar="DIR")
    p.add_argument("--schedule", default="sd35_medium_6")
    p.add_argument("--divide", type=int, default=1, help="divide the latent sizes by this")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=16)
    args = p.parse_args(argv)
    if args.build_tiny:
        build_tiny(args.build_tiny)
    if args.model:
        measure(args.model, args.schedule, args.images, args.batch, args.max_sequence_length, args.divide)


if __name__ == "__main__":
    main()
