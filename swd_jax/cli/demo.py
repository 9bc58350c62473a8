"""`swd-demo --workdir DIR [--config digits_demo] [--config.FIELD=VALUE ...]`: the built-in digits distillation.

Teacher -> teacher data -> SwD and full-resolution students -> evaluation table and image grids, each stage
cached in DIR (rerun to resume). About 13 minutes on a 2-core CPU; see docs/demo_results.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from swd_jax.cli.common import add_common_flags, enable_compile_cache, quiet_logs, run_main
from swd_jax.demo.pipeline import DEFAULT_CONFIG
from swd_jax.train.config_loading import apply_overrides, describe_fields, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swd-demo", description=__doc__.split("\n\n")[0], add_help=False,
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="writes DIR/results.md, DIR/*.png grids, and each stage's checkpoints")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config name or path (default: digits_demo)")
    p.add_argument("--workdir", help="where the teacher, data, students, grids and results go")
    p.add_argument("-h", "--help", action="store_true", help="show this help and every config field, then exit")
    add_common_flags(p)
    args, rest = p.parse_known_args(argv)
    if args.help:
        def _help():
            p.print_help()
            print(f"\nconfig fields of {args.config} (set any with --config.FIELD=VALUE):")
            print(describe_fields(load_config(args.config)))
        return run_main(_help, args.debug)
    if not args.workdir:
        p.print_usage(sys.stderr)
        print("error: --workdir is required (see --help)", file=sys.stderr)
        return 2
    quiet_logs(args.verbose)

    def _run():
        c = apply_overrides(load_config(args.config), rest)
        enable_compile_cache()
        from swd_jax.demo.pipeline import run_demo
        run_demo(c, os.path.abspath(args.workdir))

    return run_main(_run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
