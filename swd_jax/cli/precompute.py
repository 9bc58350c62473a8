"""`swd-precompute`: the command line of `swd_jax.train.precompute` (VAE posterior moments at every scale and
text embeddings, as array_record shards)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence

import jax

from swd_jax.cli.common import add_common_flags, enable_compile_cache, quiet_logs, run_main
from swd_jax.train import precompute as precompute_lib


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swd-precompute", description=precompute_lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers SD3 or FLUX pipeline folder (vae/, text_encoder*/, tokenizer*/), local, gs:// or "
                   "a Hub id (ORG/NAME[@REV])")
    p.add_argument("--data", required=True, help="SwD dataset folder: images + metainfo.csv (local or gs://)")
    p.add_argument("--out", required=True, help="output folder (local or gs://: shards uploaded as each completes)")
    p.add_argument("--scales", required=True, help="latent sizes, e.g. 64,80,96,128")
    p.add_argument("--metainfo", default="metainfo.csv")
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens (FLUX-SwD: 512)")
    p.add_argument("--shard_size", type=int, default=512)
    p.add_argument("--per_device_batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param_dtype", default="bfloat16", help="float32 if memory allows (T5 weights are fp16)")
    p.add_argument("--store_dtype", default="bfloat16")
    p.add_argument("--skip_bad", action="store_true", help="skip unreadable or missing images instead of raising")
    p.add_argument("--strict_prompts", action="store_true",
                   help="refuse metainfo rows with an empty prompt (by default they are counted and trained with "
                        "the empty prompt)")
    p.add_argument("--distributed", action="store_true",
                   help="several processes: layout from --coordinator/--num_processes/--process_id, else the "
                        "SWD_COORDINATOR/SWD_NUM_PROCESSES/SWD_PROCESS_ID variables, else auto (TPU VMs)")
    p.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    add_common_flags(p)
    a = p.parse_args(argv)
    quiet_logs(a.verbose)

    def _run():
        if a.distributed:
            from swd_jax.train import distributed
            if not (a.coordinator or os.environ.get("SWD_COORDINATOR")):
                os.environ.setdefault("SWD_DISTRIBUTED", "1")  # no explicit layout: let jax find the slice's
            distributed.initialize(a.coordinator, a.num_processes, a.process_id)
        enable_compile_cache()
        counts = precompute_lib.precompute(a.model, a.data, a.out, _scales(a.scales), metainfo=a.metainfo,
                            max_sequence_length=a.max_sequence_length, shard_size=a.shard_size,
                            per_device_batch=a.per_device_batch, dtype=a.dtype,
                            param_dtype=a.param_dtype, store_dtype=a.store_dtype, skip_bad=a.skip_bad,
                            allow_empty_prompts=not a.strict_prompts, command=_redo_command(argv))
        print(json.dumps({"host": jax.process_index(), **counts}), file=sys.stderr)

    return run_main(_run, a.debug)


def _redo_command(argv: Sequence[str] | None) -> str:
    """This command as one process runs it (the multi-process flags dropped): what redoes missing shards."""
    args, drop = list(sys.argv[1:] if argv is None else argv), {"--coordinator", "--num_processes", "--process_id"}
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
            continue
        if x in drop:
            skip = True
        elif x != "--distributed" and x.split("=")[0] not in drop:
            out.append(x)
    return "swd-precompute " + shlex.join(out)


def _scales(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--scales {text!r}: expected latent sizes separated by commas, e.g. 64,80,96,128") from None


if __name__ == "__main__":
    sys.exit(main())
