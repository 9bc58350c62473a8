"""Each benchmark's code path at a seconds-long shape, so the scripts in benchmarks/ do not rot."""
import json

import numpy as np
import pytest

from benchmarks import abstract_train, gpu, memory_plan, sampling_cost, train_cpu
from benchmarks.abstract_train import MICRO_TRAIN
from benchmarks.tiny import MICRO
from swd_jax.models.mmdit import MMDiTConfig


def test_memory_plan_compiled_and_rescaled_memory():
    # The real program on 2 devices, abstract inputs (the micro model at latent 16 instead of 128).
    compiled = memory_plan.compile_memory(MICRO_TRAIN, 2)
    assert 0 < compiled["arguments_gib"] < compiled["peak_gib"] < 1.0
    # Arguments are computed without compiling, byte-exact with what XLA counts; rescaling keeps the rest.
    _, args = abstract_train.iteration_program(MICRO_TRAIN, memory_plan.mesh_of(2))
    assert abstract_train.argument_bytes_per_device(args) / abstract_train.GiB == compiled["arguments_gib"]
    four = memory_plan.rescale(compiled, MICRO_TRAIN, 4)
    assert four["arguments_gib"] < compiled["arguments_gib"] and four["temp_gib"] == compiled["temp_gib"]
    assert memory_plan.fits(20.0, 16) == ["v6e-16", "v4-32", "v5p-32"]


def test_train_cpu_worker_protocol():
    """The parent/worker protocol of train_cpu (the torch worker; ours is the gpu script's training path), pinned to a core."""
    res = train_cpu.benchmark(MICRO, 1, repeats=1, kinds=("torch",), threads=1, log=lambda s: None)["torch"]
    assert res["median_s"] > 0 and np.isfinite(res["loss"]) and res["peak_rss_mib"] > 0
    assert res["cores_allowed"] == 1 and res["torch_threads"] == 1 and 0 < res["cores_used"] <= 1.2


def test_sampling_flops_and_schedules():
    assert sampling_cost.samplers(64)["SwD 4-step"][0] == (32, 40, 48, 64)
    assert sampling_cost.samplers(16)["SwD 6-step"][0] == (4, 6, 8, 10, 12, 16)
    cfg = MMDiTConfig(**MICRO.mmdit_fields())
    small = sampling_cost.step_flops(cfg, 8, 16, guided=False, text_tokens=8)
    big = sampling_cost.step_flops(cfg, 16, None, guided=False, text_tokens=8)
    guided = sampling_cost.step_flops(cfg, 16, None, guided=True, text_tokens=8)
    assert 0 < small < big and guided == pytest.approx(2 * big, rel=0.05)


def test_gpu_script_tiny_on_cpu(tmp_path):
    """The whole GPU script (ours + torch samplers and training iterations) at the micro shape on CPU."""
    out = tmp_path / "gpu.json"
    gpu.main(["--tiny", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())["phases"]
    for phase in ("sampler_ours", "sampler_torch", "train_ours", "train_torch"):
        assert "error" not in res[phase], res[phase]
    assert res["sampler_ours"]["SwD 4-step"]["scales"] == [8, 8, 16, 16]
    t = res["train_ours"]
    assert t["median_s"] > 0 and t["model_flops"] > 0 and np.isfinite(t["images_per_s"])


def test_tpu_levers_patch_what_they_say():
    """benchmarks/tpu_levers.py: the replicated base places every base weight whole on every device; the bf16
    elementwise lever moves a bf16 model's output by bf16 rounding only (and does move it)."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from benchmarks import tpu_levers
    from swd_jax.models.mmdit import MMDiT, example_inputs
    from swd_jax.train import sharding

    mesh = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])
    with contextlib.ExitStack() as stack:
        for patch in tpu_levers.LEVERS["replicated_base"]():
            stack.enter_context(patch)
        base, sh = abstract_train.abstract_base(MICRO_TRAIN, mesh)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(sh))
    _, fsdp = abstract_train.abstract_base(MICRO_TRAIN, mesh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(fsdp))

    cfg = MMDiTConfig(**MICRO.mmdit_fields())
    model = MMDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x, t, c, p = example_inputs(cfg, 2, latent=8)
    x, c, p = (jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate((x, c, p)))
    t = jnp.array([250.0, 750.0])
    params = model.init(jax.random.key(0), x, t, c, p)
    want = model.apply(params, x, t, c, p).astype(jnp.float32)
    with contextlib.ExitStack() as stack:
        for patch in tpu_levers.LEVERS["bf16_elementwise"]():
            stack.enter_context(patch)
        got = model.apply(params, x, t, c, p).astype(jnp.float32)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert 0 < rel < 3e-2, rel  # bf16 has 8 mantissa bits: ~4e-3 per rounding, a few roundings per block
