"""`python -m swd_jax.train --config configs/tiny.py --workdir DIR [--config.FIELD=VALUE ...]`: the SwD trainer."""
from __future__ import annotations

import json
import os

import jax

from swd_jax.train.loop import train


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        if os.environ.get("SWD_DISTRIBUTED") == "1":
            jax.distributed.initialize()
        cfg = flags.FLAGS.config
        last = train(cfg, flags.FLAGS.workdir)
        print(json.dumps({k: v for k, v in last.items()}, indent=1))

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
