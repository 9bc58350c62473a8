"""`python -m swd_jax.evaluate`: FID, CLIP score and PickScore of a folder of generated images (the paper's).

    python -m swd_jax.evaluate --images out/coco --fid-stats fid_stats_mscoco256_val.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth \\
        --clip CLIP-ViT-H-14-laion2B-s32B-b79K --pickscore PickScore_v1

Inputs:
- `--images DIR`: generated PNGs and their index `DIR/images.json`, a JSON list in evaluation order of
  `{"file": "00000.png", "prompt": "...", "seed": 0}` (file relative to DIR; written by the generate command,
  format in `swd_jax/eval/prompts.py`). `--prompts FILE` reads another index (.json), or, for a folder without
  one, a prompt CSV (`caption` column; the official coco.csv / mjhq.csv) paired with the folder's images in
  sorted file order. `--limit N` evaluates the first N (official: 5008).
- FID: `--inception` (pytorch-fid's .pth, or the .safetensors `python -m swd_jax.convert.inception` makes)
  and `--fid-stats X.npz` (mu, sigma) or `--real-images DIR`.
- `--clip DIR` / `--pickscore DIR`: transformers CLIPModel folders with safetensors weights;
  `--processor DIR` (default: the --clip folder) gives the tokenizer and preprocessing (laion's, as the
  official code uses for both).
Metrics a run has no models for are skipped. Prints a table and writes `--out` (default DIR/metrics.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image

from swd_jax.eval import fid as fid_lib
from swd_jax.eval import prompts as prompts_lib
from swd_jax.eval.protocol import Evaluator, evaluate_images


def _pairs(args) -> tuple[list[str], list[str]]:
    """(image files, prompts) in evaluation order."""
    source = args.prompts or args.images
    if source.endswith(".csv"):
        files = fid_lib.image_files(args.images)
        captions = prompts_lib.read_captions(source, limit=None)
        if len(captions) < len(files):
            raise ValueError(f"{source} has {len(captions)} prompts for {len(files)} images in {args.images}")
        pairs = list(zip(files, captions))
    else:
        pairs = [(e["file"], e["prompt"]) for e in prompts_lib.read_index(source)]
    pairs = pairs[:args.limit] if args.limit else pairs
    return [f for f, _ in pairs], [p for _, p in pairs]


def _load(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def format_table(metrics: dict) -> str:
    """A two-column table: raw values, and x100 for the cosine scores as papers print them."""
    rows = [("images", str(metrics["num_images"]))]
    if "fid" in metrics:
        rows.append(("FID", f"{metrics['fid']:.3f}"))
    for key, label in (("clip_score", "CLIP score"), ("pickscore", "PickScore")):
        if key in metrics:
            rows.append((label, f"{metrics[key]:.5f}  (x100: {100 * metrics[key]:.3f})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m swd_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder of generated images (with images.json)")
    p.add_argument("--prompts", help="image index .json, or a prompt .csv for a folder without images.json")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images (official: 5008)")
    p.add_argument("--inception", help="pytorch-fid pt_inception-2015-12-05 weights (.pth/.safetensors/.npz)")
    p.add_argument("--fid-stats", help="FID reference statistics .npz (mu, sigma)")
    p.add_argument("--real-images", help="folder of real images to compute FID reference statistics from")
    p.add_argument("--clip", help="CLIP ViT-H-14 laion2B CLIPModel folder (safetensors)")
    p.add_argument("--pickscore", help="PickScore_v1 CLIPModel folder (safetensors)")
    p.add_argument("--processor", help="CLIP processor folder (tokenizer + preprocessor); default: --clip")
    p.add_argument("--fid-batch-size", type=int, default=50)
    p.add_argument("--clip-batch-size", type=int, default=8)
    p.add_argument("--out", help="metrics JSON (default: IMAGES/metrics.json)")
    args = p.parse_args(argv)
    from tqdm import tqdm
    try:
        files, prompts = _pairs(args)
        ev = Evaluator.load(inception=args.inception, fid_stats=args.fid_stats, real_images=args.real_images,
                            clip=args.clip, pickscore=args.pickscore, processor=args.processor,
                            fid_batch_size=args.fid_batch_size, clip_batch_size=args.clip_batch_size)
        if not ev.available():
            raise ValueError("no metric to compute: give --inception with --fid-stats/--real-images, --clip, "
                             "or --pickscore")
        with tqdm(total=len(files), desc="evaluating", unit="img") as bar:
            metrics = evaluate_images((_load(f) for f in files), prompts, ev, progress=bar.update)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"evaluate: {e}")
    metrics["metrics_sources"] = {k: v for k, v in (("inception", args.inception), ("fid_stats", args.fid_stats),
                                                    ("real_images", args.real_images), ("clip", args.clip),
                                                    ("pickscore", args.pickscore)) if v}
    print(format_table(metrics))
    out = args.out or os.path.join(args.images, "metrics.json")
    with open(out, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    main()
