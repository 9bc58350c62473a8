"""The built-in default: SwD on handwritten digits (toy data, teacher training, yardsticks, the staged pipeline).

The trainer never imports this package; the digits data source registers itself with the trainer's source
registry when `swd_jax.demo.digits_source` is imported (the digits configs do that).
"""
