"""`swd-convert SRC DST`: a diffusers SD3/SD3.5 or FLUX.1 transformer -> an orbax checkpoint of our params, once.

    swd-convert SRC DST [--dtype bfloat16] [--overwrite]

SRC is a diffusers transformer folder (config.json + safetensors) or a pipeline folder (then SRC/transformer);
DST a new or empty folder. Either may be `gs://BUCKET/...` (of a pipeline folder on Cloud Storage only
transformer/ is downloaded); SRC may be a Hugging Face Hub id, ORG/NAME[@REVISION] (fetched into the Hub's cache,
only transformer/ of a pipeline; HF_HUB_OFFLINE=1: from the cache alone). The work is
`swd_jax.convert.converted.convert`; training reads DST with `load_converted(DST)` (`--config.model.path=DST`).
"""
from __future__ import annotations

import argparse
import sys

from swd_jax.cli.common import add_common_flags, quiet_logs, run_main
from swd_jax.convert.converted import DTYPES, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swd-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="diffusers transformer folder, a pipeline folder with transformer/, or a Hub id "
                        "(ORG/NAME[@REV])")
    parser.add_argument("dst", help="output folder (config.json, conversion.json, params/); local or gs://")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of the params")
    parser.add_argument("--overwrite", action="store_true", help="replace existing params in DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)

    def _run():
        cfg = convert(args.src, args.dst, args.dtype, args.overwrite, progress=not args.no_progress)
        single = f" + {cfg.num_single_layers} single" if hasattr(cfg, "num_single_layers") else ""
        print(f"wrote {type(cfg).__name__.removesuffix('Config')} with {cfg.num_layers}{single} blocks "
              f"({args.dtype}) to {args.dst}")
    return run_main(_run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
