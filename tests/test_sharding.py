"""Logical-axis shardings fit the array shapes: an axis that does not divide a dimension replicates it."""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from swd_jax.train import sharding


def test_indivisible_dimensions_are_replicated_and_place():
    mesh = sharding.make_mesh((1, 8, 1), devices=jax.devices()[:8])
    specs = {"head": P("embed", "mlp"), "w": P("embed", "mlp"), "bias": P("mlp")}
    shapes = {"head": jax.ShapeDtypeStruct((1824 // 64 * 3, 16), np.float32),  # 85 rows: 8 does not divide
              "w": jax.ShapeDtypeStruct((64, 16), np.float32), "bias": jax.ShapeDtypeStruct((16,), np.float32)}
    raw = sharding.logical_shardings(specs, mesh)
    assert raw["head"].spec == P("fsdp", "tensor")
    fitted = sharding.logical_shardings(specs, mesh, shapes=shapes)
    assert fitted["head"].spec == P(None, "tensor")  # replicated along the 85 rows
    assert fitted["w"].spec == P("fsdp", "tensor")  # divisible: still FSDP-sharded
    for name, s in shapes.items():
        placed = jax.device_put(np.ones(s.shape, np.float32), fitted[name])
        assert placed.sharding == fitted[name]
    w = jax.device_put(np.ones((64, 16), np.float32), fitted["w"])
    assert w.addressable_shards[0].data.shape == (8, 16)
