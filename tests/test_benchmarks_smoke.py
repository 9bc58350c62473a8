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
