"""The SwD trainer: loop, compiled steps, setup, data sources and records, precompute, checkpoints, sharding,
validation. `python -m swd_jax.train` is the command line (`__main__.py`); `loop.train` the function."""
