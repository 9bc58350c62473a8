"""Generate images with an SD3/SD3.5 or FLUX.1 model and an optional SwD student, in JAX.

    swd-generate --model /models/stable-diffusion-3.5-medium --lora /runs/sd35m \
        --prompt "a cat reading a newspaper" --out samples/
    swd-generate --model /models/FLUX.1-dev --lora /models/FLUX-SwD-adapter \
        --prompt "a cat reading a newspaper" --out samples/     # flux_4, guidance 4.5 embedded, 512 T5 tokens
    swd-generate --model /models/FLUX.1-dev --sampler teacher --steps 28 --guidance 3.5 \
        --prompt "a cat reading a newspaper" --out teacher/     # FluxPipeline's FLUX-dev baseline, 1024 px

--lora: a run's workdir (its latest student and its schedule), a PEFT adapter folder or a diffusers LoRA file.
--converted: our converted params (swd-convert) instead of MODEL/transformer.
--attention (auto: splash on a TPU, else xla) and --scan-blocks (default on a TPU): how the transformer runs;
the images do not depend on them beyond float rounding.
--sampler scale_wise (default; --schedule PRESET or --scales + --sigmas), full_resolution (the schedule's
sigmas at one size) or teacher (the base model without the LoRA, --steps Euler steps at --size; SD3: the
flow-matching grid with shift 3 and CFG --guidance, default 7).
FLUX (the transformer's _class_name says): --guidance is FLUX-dev's embedded guidance (default 4.5; schnell:
none), the default schedule flux_4 and 512 T5 tokens. The FLUX teacher samples as diffusers' FluxPipeline: the
sigmas of MODEL/scheduler/scheduler_config.json (else FLUX.1-dev's: dynamic shifting, mu from the latent size),
embedded guidance 3.5 by default, no CFG, 28 steps, latent size 128 (1024 px).
Prompts: --prompt (repeatable) and/or --prompts FILE (.txt: one per line; .csv: the column --prompt-column,
else the first of caption/prompt/captions/text). Writes OUT/00000.png ..., OUT/grid.png (the first 16) and
OUT/images.json: a list of {"file", "prompt", "seed", "index", + every setting}; prints ms/image. Batches are
sharded over the local devices; on several hosts each takes every P-th image and writes images.<p>.json.
MODEL, --converted, --lora, --prompts and OUT may be `gs://BUCKET/...`: a model folder or an adapter is downloaded
to a local cache (of a pipeline folder only the parts used), a converted checkpoint or a run's checkpoint is read
from there by orbax, and OUT's files are written locally first, then uploaded. MODEL and --lora may be Hugging
Face Hub ids, ORG/NAME[@REVISION] (e.g. stabilityai/stable-diffusion-3.5-medium, yresearch/swd-medium-6-steps),
fetched into the Hub's cache as diffusers' from_pretrained does (HF_HUB_OFFLINE=1: from the cache alone).

A training set (`--shard-size N`, `swd_jax.cli.generate_set`): OUT gets exactly the layout swd-precompute reads (the
PNGs + metainfo.csv with file_name,prompt), written in shards of N images with a manifest each, resumable (a rerun
verifies and skips complete shards, redoes the others) and the same bits on any number of processes. Several
processes (every host of a slice runs the same command): --coordinator/--num_processes/--process_id, else
SWD_COORDINATOR/SWD_NUM_PROCESSES/SWD_PROCESS_ID, else a TPU VM's own layout, as swd-train. The images per chip
(--batch-per-device) default to benchmarks/tpu_sampling_plan.json's largest batch on a TPU, else 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

import numpy as np

from swd_jax import storage
from swd_jax.cli.common import add_common_flags, quiet_logs, run_main
from swd_jax.eval.prompts import write_index

PROMPT_COLUMNS = ("caption", "prompt", "captions", "text")
GRID_IMAGES, GRID_CELL = 16, 256


def read_prompts(path: str, column: str | None = None) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .csv file (one column, by header name); local or
    gs://."""
    path = storage.resolve(path)
    if not storage.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if not path.endswith((".txt", ".csv")):
        raise ValueError(f"prompt file {path}: expected a .txt or .csv file")
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".txt"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    header = list(rows[0]) if rows else []
    col = column or next((c for c in PROMPT_COLUMNS if c in header), None)
    if col is None or col not in header:
        raise ValueError(f"prompt file {path}: no column {column or ' / '.join(PROMPT_COLUMNS)}; columns: {header}")
    return [r[col] for r in rows]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _check_counts(args) -> None:
    """Counts that must be positive (or >= 0), refused with one line before anything loads."""
    for flag, value, least in (("--batch", args.batch, 1), ("--num-per-prompt", args.num_per_prompt, 1),
                               ("--steps", args.steps, 1), ("--limit", args.limit, 0), ("--seed", args.seed, 0),
                               ("--size", args.size, 1), ("--max-sequence-length", args.max_sequence_length, 1),
                               ("--shard-size", args.shard_size, 1), ("--batch-per-device", args.batch_per_device, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be {'a positive integer' if least else '>= 0'}, got {value}")


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="swd-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="diffusers SD3/SD3.5 or FLUX.1 pipeline folder, or its Hub id (ORG/NAME[@REV])")
    p.add_argument("--converted", help="our converted transformer params (instead of MODEL/transformer)")
    p.add_argument("--lora", help="run workdir, PEFT adapter folder or diffusers LoRA .safetensors, or a Hub id")
    p.add_argument("--sampler", choices=("scale_wise", "full_resolution", "teacher"), default="scale_wise")
    p.add_argument("--schedule", help="preset: sd35_medium_6 (SD3 default), sd35_medium_4, sd35_large_4, "
                   "flux_4 (FLUX default)")
    p.add_argument("--scales", type=_ints, help="explicit latent sizes, e.g. 32,48,64,80,96,128")
    p.add_argument("--sigmas", type=_floats, help="explicit sigmas (one more than scales, last 0)")
    p.add_argument("--steps", type=int, default=28, help="teacher Euler steps (SD3 and FLUX: 28)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: 1 student, 7 teacher); FLUX-dev: the "
                   "embedded guidance (default 4.5 student, 3.5 teacher), no CFG")
    p.add_argument("--size", type=int, help="latent size of full_resolution / teacher (default: last scale)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a .txt (one per line) or .csv prompt file")
    p.add_argument("--prompt-column", help="the .csv column holding the prompts")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--seed", type=int, default=0, help="image n gets seed SEED + n")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--batch", type=int, help="images per batch (rounded up to a multiple of the device count)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--attention", choices=("auto", "xla", "chunked", "splash", "cudnn"), default="auto",
                   help="the transformer's attention kernel (auto: splash on a TPU, else xla; chunked: XLA over query "
                   "chunks, any backend; cudnn: GPU)")
    p.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="run runs of identical transformer blocks under one scan, weights stacked at load (default: "
                   "on a TPU, where it compiles far faster; the images equal the unrolled model's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: SD3 256, FLUX 512)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shard-size", type=int, help="write a training set (images + metainfo.csv) in resumable "
                   "shards of this many images (swd_jax.cli.generate_set)")
    p.add_argument("--batch-per-device", type=int, help="with --shard-size: images per chip (default: the TPU "
                   "sampling plan's on a TPU, else 1); --batch sets the whole batch instead")
    p.add_argument("--verify", choices=("full", "size"), default="full",
                   help="with --shard-size: how a rerun checks the complete shards it skips (sha256, or sizes only)")
    p.add_argument("--coordinator", help="several processes: host:port of process 0 (else $SWD_COORDINATOR; "
                   "TPU VMs: automatic)")
    p.add_argument("--num_processes", type=int, help="several processes: how many (else $SWD_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, help="several processes: this one's id (else $SWD_PROCESS_ID)")
    add_common_flags(p)
    return p.parse_args(argv)


def _schedule(args):
    if (args.scales is None) != (args.sigmas is None):
        raise ValueError("give --scales and --sigmas together")
    if args.scales is not None:
        if args.schedule:
            raise ValueError("give either --schedule or --scales/--sigmas, not both")
        return (args.scales, args.sigmas)
    return args.schedule


def _save_grid(path: str, images: list[np.ndarray]) -> None:
    from PIL import Image

    from swd_jax.image_files import image_grid, save_png
    cells = [np.asarray(Image.fromarray(x).resize((GRID_CELL, GRID_CELL), Image.BICUBIC)) if x.shape[0] > GRID_CELL
             else x for x in images[:GRID_IMAGES]]
    save_png(path, image_grid(np.stack(cells)))


def run(args) -> dict:
    """Generate and write everything; returns {"images": n, "ms_per_image": ..., "first_batch_s": ...}."""
    import jax

    from swd_jax.pipeline import SwDPipeline

    _check_counts(args)
    args.out = storage.resolve(args.out)  # a bad OUT is refused before the model loads
    if storage.isfile(args.out):
        raise NotADirectoryError(f"--out {args.out} is a file, not a folder")
    prompts = list(args.prompt) + (read_prompts(args.prompts, args.prompt_column) if args.prompts else [])
    if args.limit is not None:
        prompts = prompts[:args.limit]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    pipe = SwDPipeline.from_pretrained(args.model, lora=args.lora, converted=args.converted, dtype=args.dtype,
                                       max_sequence_length=args.max_sequence_length, attention_impl=args.attention,
                                       scan_blocks=args.scan_blocks)
    sampler = pipe.sampler(args.sampler, _schedule(args), steps=args.steps, guidance_scale=args.guidance,
                           size=args.size)
    if args.shard_size is not None:
        return _run_set(args, pipe, sampler, prompts)
    settings = pipe.settings(sampler)
    p, n_proc = jax.process_index(), jax.process_count()
    total = len(prompts) * args.num_per_prompt
    out = storage.Staged(args.out)  # OUT itself when local; else a local folder uploaded as images are written
    try:
        records, times, counts = _generate(args, pipe, prompts, sampler, settings, out.path, p, n_proc, total, out.sync)
    finally:
        out.close()
    steady = (sum(times[1:]) / sum(counts[1:])) if len(times) > 1 else times[0] / counts[0]
    return {"images": len(records), "ms_per_image": 1e3 * steady, "first_batch_s": times[0], "sampler": sampler.kind,
            "batches": len(times)}


def _run_set(args, pipe, sampler, prompts: list[str]) -> dict:
    """--shard-size: this process's share of the training set (swd_jax.cli.generate_set)."""
    from swd_jax.cli.generate_set import generate_set
    per_device = args.batch_per_device
    if args.batch is not None:
        if per_device is not None:
            raise ValueError("give --batch or --batch-per-device, not both")
        per_device = -(-args.batch // pipe.num_devices)
    r = generate_set(pipe, sampler, prompts, args.out, seed=args.seed, num_per_prompt=args.num_per_prompt,
                     shard_size=args.shard_size, batch_per_device=per_device, verify=args.verify,
                     progress=not args.no_progress)
    return {**r, "sampler": sampler.kind}


def _generate(args, pipe, prompts, sampler, settings, folder: str, p: int, n_proc: int, total: int, sync):
    """Sample every batch into the local `folder`, calling `sync()` after each; (records, seconds, images)."""
    from PIL import Image
    records, grid, times, counts = [], [], [], []
    for chunk, images, dt in pipe.generate_batches(prompts, sampler, seed=args.seed, num_per_prompt=args.num_per_prompt,
                                                   batch_size=args.batch, indices=range(p, total, n_proc),
                                                   progress=not args.no_progress):
        for r, img in zip(chunk, images):
            r["file"] = f"{r['index']:05d}.png"
            Image.fromarray(img).save(os.path.join(folder, r["file"]))
            records.append({"file": r["file"], "prompt": r["prompt"], "seed": r["seed"], "index": r["index"],
                            **settings})
        grid += list(images[:max(0, GRID_IMAGES - len(grid))])
        times.append(dt)
        counts.append(len(chunk))
        sync()
    if n_proc == 1:
        write_index(folder, records)  # images.json, as `swd-evaluate --images OUT` reads it
    else:
        with open(os.path.join(folder, f"images.{p}.json"), "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, ensure_ascii=False)
    if grid:
        _save_grid(os.path.join(folder, "grid.png" if n_proc == 1 else f"grid.{p}.png"), grid)
    return records, times, counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs(args.verbose)

    from swd_jax.train import supervisor
    if supervisor.wanted(args.num_processes):  # several processes: jax's native aborts kept off the console
        child = [sys.executable, "-m", "swd_jax.cli.generate", *(sys.argv[1:] if argv is None else argv)]
        return supervisor.supervise(child, args.process_id, args.coordinator)

    def _run():
        from swd_jax.cli.common import enable_compile_cache
        from swd_jax.train import distributed
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        enable_compile_cache()
        r = run(args)
        if args.shard_size is not None:
            _print_set_summary(args, r)
            return
        how = (f"after the first batch, which compiles: {r['first_batch_s']:.1f} s" if r["batches"] > 1
               else "one batch, compiling included")
        print(f"{r['images']} images ({r['sampler']}) in {args.out}: {r['ms_per_image']:.1f} ms/image ({how})")
    return run_main(_run, args.debug)


def _print_set_summary(args, r: dict) -> None:
    import jax
    p = jax.process_index()
    who = f"process {p}: " if jax.process_count() > 1 else ""
    how = (f"after the first batch, which compiles: {r['first_batch_s']:.1f} s" if r["compile_excluded"]
           else "compiling included")
    kept = f"; {r['verified']} complete shards verified ({r['verify_s']:.1f} s)" if r["verified"] else ""
    redone = f", {r['redone']} of them redone" if r["redone"] else ""
    print(f"{who}{r['images']} images ({r['shards']} shards, {r['sampler']}) in {r['seconds']:.1f} s: "
          f"{r['images_per_s_per_chip']:.3f} images/s per chip ({how}; {r['chips']} chips, batch {r['batch']})"
          f"{kept}{redone}", flush=True)
    if "set_images" in r:
        if r["processes"] > 1:
            rate = r["run_images"] / r["run_seconds"] if r["run_seconds"] > 0 else 0.0
            print(f"all {r['processes']} processes: {r['run_images']} images in {r['run_seconds']:.1f} s: "
                  f"{rate:.3f} images/s, {rate / r['run_chips']:.3f} images/s per chip ({r['run_chips']} chips; "
                  "compiling and verifying included)", flush=True)
        print(f"set complete: {r['set_images']} images and metainfo.csv in {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
