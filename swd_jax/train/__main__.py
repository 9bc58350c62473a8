"""`python -m swd_jax.train --config configs/tiny.py --workdir DIR [--config.FIELD=VALUE ...]`: the SwD trainer."""
from __future__ import annotations

import json
import sys

from swd_jax.train import distributed
from swd_jax.train.checkpoint import CorruptCheckpoint
from swd_jax.train.loop import WorkdirInUse, train
from swd_jax.train.sources import IncompleteData


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (else SWD_COORDINATOR; TPU VMs: automatic)")
    flags.DEFINE_integer("num_processes", None, "number of processes (else SWD_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's id, 0..num_processes-1 (else SWD_PROCESS_ID)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        f = flags.FLAGS
        try:
            distributed.initialize(f.coordinator, f.num_processes, f.process_id)
            last = train(f.config, f.workdir)
        except (WorkdirInUse, CorruptCheckpoint, IncompleteData, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)  # a run's state, not a bug: one line, no traceback
            sys.exit(1)
        print(json.dumps({k: v for k, v in last.items()}, indent=1))

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
