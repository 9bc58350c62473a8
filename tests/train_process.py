"""One trainer process of a multi-process or crash test (not a test module): `python tests/train_process.py
WORKDIR '{"train.steps": 4, ...}'`, small_config of test_train with those overrides, process layout from the
SWD_* variables. The parent sets XLA_FLAGS (device count), the compile cache and PYTHONPATH."""
import json
import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
if os.environ.get("SWD_TEST_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["SWD_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from swd_jax.cli.common import run_main  # noqa: E402
from swd_jax.train import distributed  # noqa: E402
from swd_jax.train.loop import train  # noqa: E402
from tests.test_train import small_config  # noqa: E402



def main() -> int:
    distributed.initialize()
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[2]).items()}
    from swd_jax.train.preemption import PREEMPTED_EXIT, Preempted
    try:
        train(small_config(**overrides), sys.argv[1])
    except Preempted as e:
        print(e, file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # as the console scripts: one `error:` line when another process failed first
