"""`swd-train --config NAME|PATH --workdir DIR [--config.FIELD=VALUE ...]`: SwD distillation, resumable.

NAME is a shipped config (tiny, sd35_medium, sd35_large, digits_demo) or a path to a .py file with get_config().
Rerunning the same command resumes from the latest checkpoint in DIR. `--help` (with or without --config) lists
every field with its value.
"""
from __future__ import annotations

import argparse
import json
import sys

from swd_jax.cli.common import add_common_flags, enable_compile_cache, quiet_logs, run_main
from swd_jax.train.config_loading import apply_overrides, config_names, describe_fields, load_config

EPILOG = """examples:
  swd-train --config tiny --workdir runs/tiny                       # random tiny model, seconds per step on CPU
  swd-train --config sd35_medium --workdir /runs/sd35m --config.model.path=/ckpt/sd35m \\
      --config.data.path=/data/sd35m_pre
outputs in DIR: config.json, metrics.jsonl, tb/ (TensorBoard), samples/step_N.png, checkpoints/, student_peft/
compiled programs are cached in $SWD_COMPILE_CACHE (default ~/.cache/swd_jax/xla; 'off' disables)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swd-train", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
                                allow_abbrev=False)
    p.add_argument("--config", help=f"config name ({', '.join(config_names())}) or path to a .py file")
    p.add_argument("--workdir", help="where checkpoints, metrics, samples and the exported student go")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although fields that change what the run trains differ from the recorded config")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="start again from step 0 although DIR/checkpoints holds steps (they are kept, renamed "
                   "<step>.restarted); without it a run never starts over while any step, set aside or not, is there")
    p.add_argument("-h", "--help", action="store_true", help="show this help and every config field, then exit")
    p.add_argument("--coordinator", help="several processes: host:port of process 0 (else $SWD_COORDINATOR; "
                   "TPU VMs: automatic)")
    p.add_argument("--num_processes", type=int, help="several processes: how many (else $SWD_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, help="several processes: this one's id (else $SWD_PROCESS_ID)")
    add_common_flags(p)
    return p


def print_help(parser: argparse.ArgumentParser, config_spec: str | None) -> None:
    parser.print_help()
    c = load_config(config_spec or "tiny")
    print(f"\nconfig fields of {config_spec or 'tiny'} (set any with --config.FIELD=VALUE; tuples as 8,12,16):")
    print(describe_fields(c))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        return run_main(lambda: print_help(parser, args.config), args.debug)
    if not args.config or not args.workdir:
        parser.print_usage(sys.stderr)
        print("error: --config and --workdir are required (see --help)", file=sys.stderr)
        return 2
    quiet_logs(args.verbose)
    from swd_jax.train import supervisor
    if supervisor.wanted(args.num_processes):  # several processes: jax's native aborts kept off the console
        child = [sys.executable, "-m", "swd_jax.train", *(sys.argv[1:] if argv is None else argv)]
        return supervisor.supervise(child, args.process_id, args.coordinator)

    def _run():
        c = apply_overrides(load_config(args.config), rest)
        if args.restart_from_scratch:  # an action on this run, not a config field: never compared on a resume
            with c.unlocked():
                c.train.restart_from_scratch = True
        import jax

        from swd_jax.train import distributed
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        cache = enable_compile_cache()
        if cache and jax.process_index() == 0:
            print(f"compile cache: {cache}", file=sys.stderr)
        from swd_jax.train.loop import train
        from swd_jax.train.preemption import PREEMPTED_EXIT, Preempted
        try:
            last = train(c, args.workdir, allow_config_change=args.allow_config_change)
        except Preempted as e:
            if jax.process_index() == 0:
                print(str(e), file=sys.stderr)
            return PREEMPTED_EXIT
        if jax.process_index() == 0 and last:
            print(json.dumps({k: v for k, v in last.items() if k in ("gen/loss", "fake/loss", "step_time_s")}))

    return run_main(_run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
