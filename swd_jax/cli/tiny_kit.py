"""`swd-tiny-kit DIR`: the command line of `swd_jax.demo.tiny_kit` (tiny random stand-ins for everything the
README journey reads)."""
from __future__ import annotations

import argparse
import sys

from swd_jax.cli.common import add_common_flags, quiet_logs, run_main
from swd_jax.demo import tiny_kit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swd-tiny-kit", description=tiny_kit.__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(tiny_kit.__doc__.split("\n\n")[1:3]))
    p.add_argument("folder", metavar="DIR", help="where to write the kit (new, empty, or an earlier kit)")
    p.add_argument("--images", type=int, default=8, help="how many images in DIR/data (default 8)")
    add_common_flags(p)
    args = p.parse_args(argv)
    quiet_logs(args.verbose)

    def _run():
        paths = tiny_kit.write_kit(args.folder, args.images, quiet=not args.verbose)
        width = max(map(len, paths))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in paths.items()))

    return run_main(_run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
