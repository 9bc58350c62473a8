"""The SwD iteration with splash attention compiles for a real TPU slice (v5p:2x2x1) from this CPU host.

libtpu's compiler runs ahead of time on the topology's abstract devices: the program is the one the trainer
jits (`benchmarks/abstract_train.py`), sharded over 4 v5p chips, with the Mosaic splash kernel (not Pallas
interpret mode), and the TPU compiler's memory and cost analyses come back.
"""
import dataclasses
import json

import jax
import pytest

from benchmarks import tpu_plan
from benchmarks.abstract_train import MICRO_FLUX_TRAIN, MICRO_TRAIN
from launch import plan_check

TPU_KW = dict(batch_per_device=2, dtype="bfloat16", param_dtype="bfloat16", attention_impl="splash")
TINY_TPU = dataclasses.replace(MICRO_TRAIN, name="micro-tpu", **TPU_KW)
TINY_FLUX_TPU = dataclasses.replace(MICRO_FLUX_TRAIN, name="micro-flux-tpu", **TPU_KW)


@pytest.fixture
def no_compilation_cache():
    """A TPU executable cannot be read back from the persistent cache without a TPU client: store none."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def test_tiny_swd_iteration_compiles_for_v5p(no_compilation_cache):
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) is the TPU compiler for AOT compiles")
    with pytest.raises(ValueError, match="default matmul precision"):  # conftest asks for "highest"
        tpu_plan.compile_plan(TINY_TPU, "v5p:2x2x1")
    with jax.default_matmul_precision("default"):  # as in training: bf16 dots, f32 accumulation
        row = tpu_plan.compile_plan(TINY_TPU, "v5p:2x2x1")
    assert row["mosaic_kernels"] > 0  # the splash kernel is a TPU custom call in the compiled program
    assert row["chips"] == 4 and row["hbm_gib"] == 95.0
    assert 0 < row["arguments_gib"] < row["peak_gib"] < 1.0 and row["temp_gib"] > 0
    assert row["flops_per_chip"] > 0 and row["model_flops"] > 0 and row["seconds"] > 0
    assert 0 < row["mfu"] < 1 and row["images_per_s"] > 0
    # The kernels execute at least the model's attention FLOPs (more: padding to the 128 blocks)
    assert row["splash_flops_per_chip"] * row["chips"] >= row["attention_flops"] > 0
    # Remat "attention" keeps the kernel's residuals (no forward rerun in the backward) and the fused backward
    # forms dq in the dk/dv kernel: fewer kernels and 31 % fewer kernel FLOPs here (measured 0.692).
    with jax.default_matmul_precision("default"):
        lean = tpu_plan.compile_plan(tpu_plan.cut(TINY_TPU, None, 2, "attention", "splash_fused"), "v5p:2x2x1")
    assert lean["remat"] == "attention" and lean["attention"] == "splash_fused"
    assert lean["mosaic_kernels"] < row["mosaic_kernels"]
    assert lean["splash_flops_per_chip"] < 0.75 * row["splash_flops_per_chip"]


def test_tiny_flux_swd_iteration_compiles_for_v5p(no_compilation_cache):
    """FLUX-dev's iteration (guidance embedding, double and single blocks) with splash and remat 'dots'."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) is the TPU compiler for AOT compiles")
    shape = tpu_plan.cut(TINY_FLUX_TPU, None, 2, remat="dots")
    with jax.default_matmul_precision("default"):
        row = tpu_plan.compile_plan(shape, "v5p:2x2x1")
    assert row["mosaic_kernels"] > 0 and row["remat"] == "dots" and row["blocks"] == 3
    assert 0 < row["arguments_gib"] < row["peak_gib"] < 1.0 and 0 < row["mfu"] < 1
    assert row["splash_flops_per_chip"] * row["chips"] >= row["attention_flops"] > 0


def test_splash_flops_count_loops_and_callers():
    """Kernel FLOPs from operand shapes; a while body counts its trip count times per run of its caller."""
    ops = "s8[1,1,1]{2,1,0}, s8[1,1,1]{2,1,0}, s8[1,1,1]{2,1,0}, bf16[2,3,128,16]{3,2,1,0}, bf16[2,3,256,16]{3,2,1,0}"
    kernel = lambda kind: (f"  %splash_mha_{kind}_residuals.1 = (f32[1]) custom-call(%a), "
                           f'custom_call_target="tpu_custom_call", operand_layout_constraints={{{ops}}}, x={{}}')
    hlo = "\n".join([
        "%body.1 (p: f32[]) -> f32[] {", kernel("fwd"), kernel("dq"), "}",
        "%cond.1 (p: f32[]) -> pred[] {", "  ROOT %c = pred[] constant(true)", "}",
        "%sub.1 (p: f32[]) -> f32[] {", kernel("dkv"),
        '  %w = f32[] while(%p), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}',
        "}",
        "ENTRY %main.1 (p: f32[]) -> f32[] {", kernel("fwd"), "  %a = f32[] call(%p), to_apply=%sub.1",
        "  %b = f32[] call(%p), to_apply=%sub.1", "}"])
    unit = 2 * 3 * 128 * 16 * 256  # batch x heads x L x D x S
    # entry: 1 fwd; sub runs twice: 1 dkv + 5 x (fwd + dq) each
    assert tpu_plan.splash_flops(hlo) == unit * (4 + 2 * (8 + 5 * (4 + 6)))
    # Without known_trip_count (what libtpu writes for a scan): the s32 limit the condition compares with.
    hlo = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', "").replace(
        "  ROOT %c = pred[] constant(true)", "  %n = s32[]{:T(128)} constant(3)\n  ROOT %c = pred[] compare(%i, %n)")
    assert tpu_plan.splash_flops(hlo) == unit * (4 + 2 * (8 + 3 * (4 + 6)))


def test_cut_models_keep_the_fraction_of_blocks_without_remat():
    from benchmarks.abstract_train import MEDIUM
    assert tpu_plan.cut(MEDIUM, 8, 8, "attention", "splash_fused", 6).blocks_without_remat == 2  # 6 of 24 -> 2 of 8
    with pytest.raises(ValueError, match="6 of 24 blocks does not scale to a 2-block cut .pick depths that are multiples of 4"):
        tpu_plan.cut(MEDIUM, 2, 8, "attention", "splash_fused", 6)
    assert tpu_plan.plan_key("medium", "v5p:2x2x1", "attention", "splash_fused", 6) == \
        "medium@v5p:2x2x1/remat=attention/attention=splash_fused/blocks_without_remat=6"


def test_plan_extrapolates_depth_and_batch(tmp_path, capsys):
    rows = [{"model": "m[2 blocks]", "blocks": n, "topology": "v5p:2x2x1", "chips": 4, "batch_per_chip": b,
             "hbm_gib": 95.0, "extrapolated": False, "compile_s": 1.0, "arguments_gib": 1.0 * n,
             "outputs_gib": 0.0, "alias_gib": 0.0, "temp_gib": n * b, "peak_gib": 1.0 * n + n * b,
             "flops_per_chip": 1e12 * n * b, "model_flops": 4e12 * n * b, "seconds": 0.01 * n * b,
             "compiler_seconds": 0.01 * n * b, "loop_correction": 1.0, "splash_flops_per_chip": 0.0,
             "images": 6 * b * 4, "images_per_s": 6 * b * 4 / (0.01 * n * b), "mfu": 0.5}
            for n in (2, 4) for b in (4, 8)]
    full = tpu_plan.extrapolate(rows, 24)
    assert [r["batch_per_chip"] for r in full] == [4, 8] and all(r["extrapolated"] for r in full)
    assert full[1]["peak_gib"] == pytest.approx(24 + 24 * 8) and full[1]["seconds"] == pytest.approx(1.92)
    # peak = 24 + 24 b at full depth: b <= (95 - 24) / 24 = 2.96, and (85.5 - 24) / 24 = 2.56 with headroom
    assert tpu_plan.largest_batch(full, 95.0) == 2 and tpu_plan.largest_batch(full, 40.0) is None
    # A shallower cut off the line (a 1-block compile) stays a row but the line runs through the two deepest.
    off_line = [{**rows[0], "blocks": 1, "peak_gib": 50.0, "model": "m[1 blocks]"}]
    assert tpu_plan.extrapolate(off_line + rows, 24)[0]["peak_gib"] == pytest.approx(24 + 24 * 4)
    cut = tpu_plan.cut(tpu_plan.MEDIUM, 4, 8)
    assert (cut.model.num_layers, cut.model.dual_attention_layers, cut.cls_block) == (4, (0, 1), 2)
    # The command line reuses rows compiled before (none to compile here) and summarises them.
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"medium@v5p:2x2x1": {"rows": rows}}))
    tpu_plan.main(["--model", "medium", "--blocks", "2,4", "--batch", "4,8", "--json", str(path)])
    assert "largest batch/chip that fits 95 GiB: 2 (with 10% headroom: 2)" in capsys.readouterr().out
    # A batch slope that shrinks with depth (seen with 1-/2-block cuts) gives no largest batch: a lower bound.
    flat = [{**r, "peak_gib": r["blocks"] + r["batch_per_chip"] * (2 - 0.05 * r["blocks"])} for r in rows]
    path.write_text(json.dumps({"medium@v5p:2x2x1": {"rows": flat}}))
    tpu_plan.main(["--model", "medium", "--blocks", "2,4", "--batch", "4,8", "--json", str(path)])
    assert "no largest batch from that slope" in capsys.readouterr().out
    assert json.loads(path.read_text())["medium@v5p:2x2x1"]["max_batch_is_lower_bound"]
    path.write_text(json.dumps({"medium@v5p:2x2x1": {"rows": rows}}))
    tpu_plan.main(["--model", "medium", "--blocks", "2,4", "--batch", "4,8", "--json", str(path)])
    capsys.readouterr()
    tpu_plan.main(["--table", "--json", str(path)])  # the README's table, from the plan file
    table = capsys.readouterr().out
    assert "| m | v5p:2x2x1 | full | **24, extrapolated** | 8 |" in table
    assert "largest batch/chip that fits: 2, with 10 % headroom: 2 |" in table
    one_depth = {"medium@v4:2x2x1": {**json.loads(path.read_text())["medium@v5p:2x2x1"], "full_blocks": 24,
                                     "rows": [r for r in rows if r["blocks"] == 2]}}
    assert "| no full-depth figure: one depth compiled |" in tpu_plan.markdown(one_depth)


def test_launch_plan_check_refuses_a_batch_that_does_not_fit(tmp_path, monkeypatch, capsys):
    rows = [{"chips": 4, "blocks": 24, "batch_per_chip": b, "peak_gib": 20.0 + 10 * b, "seconds": 0.1 * b,
             "mfu": 0.4} for b in (2, 4)]
    plan = {"medium@v5p:2x2x1": {"model": "SD3.5-Medium", "topology": "v5p:2x2x1", "hbm_gib": 95.0,
                                 "max_batch_per_chip": 7, "max_batch_per_chip_10pct_headroom": 6,
                                 "extrapolated": True, "rows": rows}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setattr(plan_check, "PLAN", str(tmp_path / "plan.json"))
    config = "configs/sd35_medium.py"  # global batch 64: 8 images/chip on v5p-16 (8 chips), 4 on v5p-32
    assert plan_check.main(["v5p-16", config]) == 1
    assert "8 images/chip does not fit (7 does)" in capsys.readouterr().out
    assert plan_check.main(["v5p-16", config, "--force-batch"]) == 0
    assert plan_check.main(["v5p-32", config]) == 0
    assert plan_check.main(["v5p-16", "sd35_medium"]) == 1  # a config by name, as swd-train takes it
    assert plan_check.main(["v5p-16", config, "--config.train.batch_size=48"]) == 0  # 6 per chip
    assert plan_check.main(["v6e-8", config]) == 0  # no v6e plan: no check
    # A plan of one cut depth (v4: deeper compiles exceed this host's RAM) has no full-depth figure: no check.
    plan["medium@v4:2x2x1"] = {**plan["medium@v5p:2x2x1"], "topology": "v4:2x2x1", "full_blocks": 24,
                               "max_batch_per_chip": None, "rows": [{**r, "blocks": 2} for r in rows]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert plan_check.main(["v4-32", config]) == 0  # 16 chips: 4 per chip
    assert "has no medium plan for v4 with remat full; launching without a batch check" in capsys.readouterr().out
    # A run with another remat policy is checked against that policy's plan only (none here: no check).
    assert plan_check.main(["v5p-16", config, "--config.model.remat_policy=dots"]) == 0
    plan["medium@v5p:2x2x1/remat=dots"] = {**plan["medium@v5p:2x2x1"], "max_batch_per_chip": 5}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert plan_check.main(["v5p-16", config, "--config.model.remat_policy=dots"]) == 1
    assert "remat dots" in capsys.readouterr().out
    assert plan_check.main(["v5p-16", config, "--config.model.remat=False"]) == 0  # no "off" plan
    # Without a remat override, a faster variant that fits with 10 % headroom is suggested (not applied).
    off_rows = [{**r, "mfu": 0.6} for r in rows]
    plan["medium@v5p:2x2x1/remat=off"] = {**plan["medium@v5p:2x2x1"], "rows": off_rows,
                                          "max_batch_per_chip": 6, "max_batch_per_chip_10pct_headroom": 5}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert plan_check.main(["v5p-32", config]) == 0  # 4 per chip
    assert "remat off fits this batch with 10 % headroom and is faster (estimated MFU 0.60 vs 0.40): add " \
           "--config.model.remat=False" in capsys.readouterr().out
    # The fused-backward kernel is part of the variant: its plans are apart, and suggested with both flags.
    plan["medium@v5p:2x2x1/remat=attention/attention=splash_fused"] = {
        **plan["medium@v5p:2x2x1/remat=off"], "rows": [{**r, "mfu": 0.7} for r in rows]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert plan_check.main(["v5p-32", config]) == 0
    assert "remat attention with splash_fused fits this batch with 10 % headroom and is faster (estimated MFU " \
           "0.70 vs 0.40): add --config.model.remat_policy=attention --config.model.attention_impl=splash_fused" \
           in capsys.readouterr().out
    assert plan_check.main(["v5p-16", config, "--config.model.attention_impl=splash_fused"]) == 0  # no such plan
    assert "no medium plan for v5p with remat full, splash_fused" in capsys.readouterr().out
    plan["medium@v5p:2x2x1/remat=attention/attention=splash_fused/blocks_without_remat=6"] = {
        **plan["medium@v5p:2x2x1/remat=off"], "rows": [{**r, "mfu": 0.8} for r in rows]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert plan_check.main(["v5p-32", config]) == 0
    assert "remat attention with splash_fused and 6 blocks without remat fits this batch with 10 % headroom and is " \
           "faster (estimated MFU 0.80 vs 0.40): add --config.model.remat_policy=attention " \
           "--config.model.attention_impl=splash_fused --config.model.blocks_without_remat=6" in capsys.readouterr().out
    assert plan_check.main(["v5p-16", config, "--config.train.batch_size=48"]) == 0  # 6 per chip: off does not fit
    # A plan with only cut-depth compiles (no full-depth row) is not used for the check.
    plan["medium@v5p:2x2x2"] = {"model": "SD3.5-Medium", "topology": "v5p:2x2x2", "hbm_gib": 95.0,
                                "full_blocks": 24, "max_batch_per_chip": None,
                                "max_batch_per_chip_10pct_headroom": None,
                                "rows": [{**r, "chips": 8, "blocks": 2} for r in rows]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert plan_check.main(["v5p-16", config, "--config.train.batch_size=48"]) == 0
    assert "TPU plan for SD3.5-Medium on v5p:2x2x1" in capsys.readouterr().out
    assert "is faster" not in capsys.readouterr().out
    plan["medium@v5p:2x2x1"]["max_batch_is_lower_bound"] = True  # only 7 compiled: 8 is unverified, not refused
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert plan_check.main(["v5p-16", config]) == 0
    # The run's wall time: iteration s trains interval s mod K; each interval's seconds at the nearest planned
    # batch, scaled by the batch ratio (sd35_medium: 3000 iterations, 8 images/chip on v5p-16).
    plan["medium@v5p:2x2x1"]["interval_seconds"] = {"4": [1.0, 2.0, 3.0, 4.0]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    plan_check.main(["v5p-16", config])
    assert "run time: 3000 iterations ~ 4.2 h (s/iteration per scale interval 2.0, 4.0, 6.0, 8.0, scaled from 4 " \
           "images/chip; compiles not included)" in capsys.readouterr().out
    assert tpu_plan.run_hours([1.0, 2.0, 3.0], 7) == pytest.approx((3 * 1 + 2 * 2 + 2 * 3) / 3600)
    # Every interval compiled (benchmarks.tpu_plan --intervals compile), on another slice of the same variant: that
    # plan's figure, said to be compiled, is preferred to an estimate.
    plan["medium@v5p:2x2x2"] = {**plan["medium@v5p:2x2x1"], "topology": "v5p:2x2x2",
                                "interval_seconds": {"8": [2.0, 3.0, 4.0, 5.0]},
                                "interval_compiled": {"8": [True] * 4}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    plan_check.main(["v5p-16", config])
    assert "run time: 3000 iterations ~ 2.9 h (s/iteration per scale interval 2.0, 3.0, 4.0, 5.0; compiles not " \
           "included; every interval compiled on v5p:2x2x2)" in capsys.readouterr().out
    # A bigger slice's plan that compiled only smaller batches than the launch's (a lower bound) defers to a smaller
    # slice's plan that measured the largest batch: 8 images/chip on v5p-16 is refused by v5p:2x2x1's 7.
    plan["medium@v5p:2x2x1"]["max_batch_is_lower_bound"] = False
    plan["medium@v5p:2x2x2"] = {**plan["medium@v5p:2x2x1"], "topology": "v5p:2x2x2", "max_batch_per_chip": 6,
                                "max_batch_is_lower_bound": True, "rows": [{**r, "chips": 8} for r in rows]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert plan_check.main(["v5p-16", config]) == 1
    out = capsys.readouterr().out
    assert "the v5p:2x2x2 plan compiled only up to 6 images/chip; checking 8 against the v5p:2x2x1 plan" in out
    assert "8 images/chip does not fit (7 does)" in out
    assert plan_check.main(["v5p-16", config, "--config.train.batch_size=48"]) == 0  # 6 per chip: v5p:2x2x2 covers it


def test_plan_compiles_scale_intervals(tmp_path, capsys, monkeypatch):
    """--intervals compile: each interval below the top compiled once (then reused from the plan file), the top
    interval from its full-depth row; the seconds and which were compiled kept per batch; the table lists them."""
    row = {"model": "SD3.5-Medium", "blocks": 24, "topology": "v5p:2x2x1", "chips": 4, "batch_per_chip": 8,
           "hbm_gib": 95.0, "extrapolated": False, "compile_s": 1.0, "arguments_gib": 1.0, "outputs_gib": 0.0,
           "alias_gib": 0.0, "temp_gib": 9.0, "peak_gib": 10.0, "flops_per_chip": 1e15, "model_flops": 4e15,
           "seconds": 8.0, "compiler_seconds": 8.0, "loop_correction": 1.0, "splash_flops_per_chip": 0.0,
           "images": 192, "images_per_s": 24.0, "mfu": 0.5}
    compiled = []
    monkeypatch.setattr(tpu_plan, "compile_plan", lambda s, topo, hlo_dir, k: compiled.append(k) or
                        {**row, "interval": k, "seconds": k + 1.0, "flop_count_s": 0.0})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"medium@v5p:2x2x1": {"rows": [row]}}))
    argv = ["--model", "medium", "--batch", "8", "--intervals", "compile", "--json", str(path)]
    tpu_plan.main(argv + ["--at-intervals", "0,2"])
    assert compiled == [0, 2]
    tpu_plan.main(argv)
    assert compiled == [0, 2, 1]  # 0 and 2 from the plan file
    plan = json.loads(path.read_text())["medium@v5p:2x2x1"]
    assert plan["interval_seconds"] == {"8": [1.0, 2.0, 3.0, 8.0]} and plan["interval_compiled"] == {"8": [True] * 4}
    assert "8 images/chip: s/iteration per interval 1.00, 2.00, 3.00, 8.00 (compiled)" in capsys.readouterr().out
    assert [r["latent"] for r in sorted(plan["interval_rows"], key=lambda r: r["interval"])] == [64, 80, 96]
    tpu_plan.main(["--model", "medium", "--batch", "8", "--json", str(path)])  # a plain run keeps them
    assert json.loads(path.read_text())["medium@v5p:2x2x1"]["interval_compiled"] == {"8": [True] * 4}
    tpu_plan.main(["--table", "--json", str(path)])
    assert "| SD3.5-Medium | v5p:2x2x1 | full | 24, latents 80 | 8 |" in capsys.readouterr().out
    # A program too big for HBM: the compiler's refusal is one line, nothing is stored.
    def too_big(*_):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                         "HLO temporaries (119.14G) exceeds available HBM (95.74G).")
    monkeypatch.setattr(tpu_plan, "compile_plan", too_big)
    tpu_plan.main(["--model", "medium", "--batch", "8", "--remat", "off", "--intervals", "compile", "--at-intervals",
                   "0", "--json", str(path)])
    assert "does not fit: 119.14 GiB of temporaries per chip (HBM 95 GiB)" in capsys.readouterr().out
    assert "interval_rows" not in json.loads(path.read_text()).get("medium@v5p:2x2x1/remat=off", {})
