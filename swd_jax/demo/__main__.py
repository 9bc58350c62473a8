"""`python -m swd_jax.demo --workdir DIR`: the built-in digits distillation, end to end (see pipeline.py)."""
from __future__ import annotations

import os

import jax

from swd_jax.demo.pipeline import DEFAULT_CONFIG, run_demo


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "the demo config (configs/digits_demo.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where the teacher, data, students, grids and results go")
    flags.mark_flags_as_required(["workdir"])

    def _main(_):
        workdir = os.path.abspath(flags.FLAGS.workdir)
        # Compiled programs are cached on disk: a rerun (or the resumed half of an interrupted one) skips them.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        run_demo(flags.FLAGS.config, workdir)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
