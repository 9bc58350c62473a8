"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; cheap compiles; a compile cache."""
import os
import tempfile

# LLVM optimisation level 0 cuts XLA:CPU compile time by about a third for our train-step programs; the
# tests are compile-bound (tiny models), and the numerics are the same IEEE float32 operations.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs (e.g. an interrupted and a resumed run) compile once per session.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "swd_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
