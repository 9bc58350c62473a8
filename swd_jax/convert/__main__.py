"""Convert a diffusers SD3/SD3.5 transformer to an orbax checkpoint of our MMDiT params, once, before training.

    python -m swd_jax.convert SRC DST [--dtype bfloat16] [--overwrite]

SRC is a diffusers transformer folder (config.json + safetensors) or a pipeline folder (then SRC/transformer).
The work is `swd_jax.convert.converted.convert`; training reads DST with `load_converted(DST)`.
"""
from __future__ import annotations

import argparse
import sys

from swd_jax.convert.converted import DTYPES, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swd_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="diffusers transformer folder, or a pipeline folder with transformer/")
    parser.add_argument("dst", help="output folder (config.json, conversion.json, params/)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of the params")
    parser.add_argument("--overwrite", action="store_true", help="replace existing params in DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = convert(args.src, args.dst, args.dtype, args.overwrite, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    single = f" + {cfg.num_single_layers} single" if hasattr(cfg, "num_single_layers") else ""
    print(f"wrote {type(cfg).__name__.removesuffix('Config')} with {cfg.num_layers}{single} blocks ({args.dtype}) "
          f"to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
