"""`swd-evaluate`: FID, CLIP score and PickScore of a folder of generated images (the paper's).

    swd-evaluate --images out/coco --fid-stats fid_stats_mscoco256_val.npz \\
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
- `--clip DIR` / `--pickscore DIR`: transformers CLIPModel folders with safetensors weights, or their Hub ids
  (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, yuvalkirstain/PickScore_v1; only safetensors and JSON/text files);
  `--processor DIR` (default: the --clip folder) gives the tokenizer and preprocessing (laion's, as the
  official code uses for both).
Metrics a run has no models for are skipped. Prints a table and writes `--out` (default DIR/metrics.json).
Every path may be `gs://BUCKET/...`: the images and the metric models are downloaded to a local cache
(`swd_jax.storage.local_copy`), the metrics JSON is written there.
"""
from __future__ import annotations

import argparse
import json
import sys

from PIL import Image

from swd_jax import storage
from swd_jax.cli.common import add_common_flags, quiet_logs, run_main
from swd_jax.eval import fid as fid_lib
from swd_jax.eval import prompts as prompts_lib
from swd_jax.eval.protocol import Evaluator, evaluate_images


def _pairs(args) -> tuple[list[str], list[str]]:
    """(image files, prompts) in evaluation order; `images` is the local folder (a copy of a gs:// one)."""
    images = storage.local_copy(storage.resolve(args.images), what="image folder")
    source = storage.local_copy(storage.resolve(args.prompts), what="prompt file") if args.prompts else images
    if not args.prompts and not storage.isfile(storage.join(images, prompts_lib.INDEX_NAME)):
        if not storage.isdir(images):
            raise FileNotFoundError(f"image folder {args.images} does not exist")
        found = [f for f in storage.listdir(images) if f.rsplit(".", 1)[-1].lower() in fid_lib.IMAGE_EXTENSIONS]
        raise FileNotFoundError(f"{args.images} has no {prompts_lib.INDEX_NAME} (swd-generate writes it)" + (
            f"; to pair its {len(found)} images with prompts give --prompts FILE.csv" if found else
            " and no images"))
    if source.endswith(".csv"):
        files = fid_lib.image_files(images)
        captions = prompts_lib.read_captions(source, limit=None)
        if len(captions) < len(files):
            raise ValueError(f"{args.prompts} has {len(captions)} prompts for {len(files)} images in {args.images}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swd-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder of generated images (with images.json); local or gs://")
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
    p.add_argument("--out", help="metrics JSON (default: IMAGES/metrics.json); local or gs://")
    add_common_flags(p)
    return p


def evaluate(args) -> dict:
    """Compute the metrics `args` ask for, print the table, write the JSON; returns the metrics."""
    from tqdm import tqdm
    for name in ("limit", "fid_batch_size", "clip_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    out = storage.resolve(args.out or storage.join(storage.resolve(args.images), "metrics.json"))
    files, prompts = _pairs(args)
    try:
        ev = Evaluator.load(inception=args.inception, fid_stats=args.fid_stats, real_images=args.real_images,
                            clip=args.clip, pickscore=args.pickscore, processor=args.processor,
                            fid_batch_size=args.fid_batch_size, clip_batch_size=args.clip_batch_size)
    except ImportError as e:  # e.g. a .pth Inception without torch installed
        raise ValueError(f"{e} (a .pth Inception needs the torch extra: pip install -e .[torch])") from None
    if not ev.available():
        raise ValueError("no metric to compute: give --inception with --fid-stats/--real-images, --clip, "
                         "or --pickscore")
    with tqdm(total=len(files), desc="evaluating", unit="img") as bar:
        metrics = evaluate_images((_load(f) for f in files), prompts, ev, progress=bar.update)
    metrics["metrics_sources"] = {k: v for k, v in (("inception", args.inception), ("fid_stats", args.fid_stats),
                                                    ("real_images", args.real_images), ("clip", args.clip),
                                                    ("pickscore", args.pickscore)) if v}
    print(format_table(metrics))
    storage.write_text(out, json.dumps(metrics, indent=1))
    print(f"wrote {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs(args.verbose)
    return run_main(lambda: evaluate(args) and None, args.debug)


if __name__ == "__main__":
    sys.exit(main())
