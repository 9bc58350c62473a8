"""Corrupt and incomplete files, poisoned states, a busy workdir: a clear error or a named fallback, never garbage."""
import glob
import json
import os

import numpy as np
import pytest

from swd_jax.convert import orbax_params as params_io
from swd_jax.train import checkpoint as ck


def _state(s: int) -> dict:
    r = np.random.default_rng(s)
    return {"w": r.normal(size=(64, 64)).astype(np.float32), "opt": {"nu": np.arange(1000, dtype=np.float32) * s},
            "step": np.int32(s)}


def _three_steps(d) -> str:
    with ck.Checkpointer(str(d), save_every=1, keep=3) as c:
        for s in (1, 2, 3):
            c.save(s, _state(s), {"step": s})
    return str(d)


def _largest_array_file(d, step=3) -> str:
    return max(glob.glob(os.path.join(d, str(step), "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _garble(d):  # 16 random bytes inside the largest array file (the probe): values change silently
    f = _largest_array_file(d)
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2:len(b) // 2 + 16] = np.random.default_rng(0).bytes(16)
    open(f, "wb").write(bytes(b))


def _truncate(d):
    f = _largest_array_file(d)
    data = open(f, "rb").read()
    open(f, "wb").write(data[:len(data) // 2])


def _bad_metadata_json(d):
    open(os.path.join(d, "3", "state", "_METADATA"), "w").write("{not json")


def _empty_newer_step(d):
    os.makedirs(os.path.join(d, "4"))


@pytest.mark.parametrize("damage", [_garble, _truncate, _bad_metadata_json, _empty_newer_step])
def test_broken_latest_checkpoint_falls_back_naming_it(tmp_path, capsys, damage):
    d = _three_steps(tmp_path / "ckpt")
    damage(d)
    with ck.Checkpointer(d, save_every=1, keep=3) as c:
        state, extra = c.restore_latest(params_io.abstract_like(_state(0)))
    broken = 4 if damage is _empty_newer_step else 3
    good = 3 if damage is _empty_newer_step else 2
    assert extra == {"step": good}
    np.testing.assert_array_equal(np.asarray(state["w"]), _state(good)["w"])
    err = capsys.readouterr().err
    assert f"checkpoint step {broken} is broken" in err and os.path.join(d, str(broken)) in err, err


def test_every_checkpoint_broken_stops_instead_of_starting_over(tmp_path):
    d = _three_steps(tmp_path / "ckpt")
    for s in (1, 2, 3):
        open(os.path.join(d, str(s), "state", "_METADATA"), "w").write("")
    with ck.Checkpointer(d, save_every=1, keep=3) as c:
        with pytest.raises(ck.CorruptCheckpoint, match=r"every checkpoint .* is broken \(steps \[3, 2, 1\]\)"):
            c.restore_latest(params_io.abstract_like(_state(0)))


def test_a_config_change_is_not_mistaken_for_corruption(tmp_path):
    d = _three_steps(tmp_path / "ckpt")
    other = _state(0)
    other["w"] = np.zeros((64, 32), np.float32)
    with ck.Checkpointer(d, save_every=1, keep=3) as c, pytest.raises(ValueError, match="w"):
        c.restore_latest(params_io.abstract_like(other))


def test_a_non_finite_state_is_never_saved(tmp_path):
    with ck.Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=1) as c:
        c.save(1, _state(1), {"step": 1})
        poisoned = _state(2)
        poisoned["opt"]["nu"][7] = np.inf
        with pytest.raises(FloatingPointError, match=r"step 2: non-finite values in \[.opt/nu.\]; "
                                                     r"not saved\. The last good checkpoint \(step 1\)"):
            c.save(2, poisoned, {"step": 2})
        c.wait_until_finished()
        assert c.all_steps() == [1]  # keep=1 did not rotate the good step out


def test_checksums_do_not_depend_on_the_sharding():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    one, _ = ck.state_digests({"x": jax.device_put(x, jax.devices()[0])})
    sharded, _ = ck.state_digests({"x": jax.device_put(x, NamedSharding(mesh, P("b", "a")))})
    assert one == sharded
    y = x.copy()
    y[3, 5] = np.nextafter(y[3, 5], np.float32(np.inf))  # one ulp
    assert ck.state_digests({"x": y})[0] != one


def test_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
    from swd_jax.train.loop import WorkdirInUse, WorkdirLock
    first = WorkdirLock(str(tmp_path))
    try:
        with pytest.raises(WorkdirInUse, match=rf"is in use by pid {os.getpid()} on "):
            WorkdirLock(str(tmp_path))
    finally:
        first.release()
    WorkdirLock(str(tmp_path)).release()  # free again once the first run ends


def test_metrics_jsonl_holds_each_step_once_and_survives_deletion(tmp_path, capsys):
    from swd_jax.train.loop import MetricsWriter
    w = MetricsWriter(str(tmp_path))
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    w.close()  # killed after step 5; the checkpoint was at 3: the resume replays 4 and 5
    w = MetricsWriter(str(tmp_path), start=3)
    w.write(4, {"loss": 4.0})
    os.remove(tmp_path / "metrics.jsonl")
    w.write(5, {"loss": 5.0})
    w.close()
    assert "was deleted during the run; recreated from step 5" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [5]


# ----------------------------------------------------------------------------------------------------------------
# precomputed data: checked at start-up
# ----------------------------------------------------------------------------------------------------------------
def _precomputed(d, n_rows=5, shard_size=3):
    from swd_jax.train.precompute import shard_name, shard_ranges
    from swd_jax.train.records import write_array_records
    os.makedirs(d)
    ranges = shard_ranges(n_rows, shard_size)
    for i, (a, b) in enumerate(ranges):
        f = os.path.join(d, shard_name(i, len(ranges)))
        write_array_records(f, [{"x": np.full(4, r, np.float32)} for r in range(a, b)])
        json.dump({"rows": b - a, "skipped_bad": 0}, open(f + ".json", "w"))
    json.dump({"n_rows": n_rows, "shard_size": shard_size}, open(os.path.join(d, "precompute.json"), "w"))
    return str(d), sorted(glob.glob(os.path.join(d, "*.array_record")))


def test_incomplete_precomputed_data_is_named_at_start_up(tmp_path):
    from swd_jax.train.sources import IncompleteData, check_precomputed
    d, files = _precomputed(tmp_path / "ok")
    assert check_precomputed(d, files) == 5
    d, files = _precomputed(tmp_path / "deleted")
    os.remove(files[1])
    with pytest.raises(IncompleteData, match=r"1 of 2 shards missing: \['precomputed-00001-of-00002"):
        check_precomputed(d, files[:1])
    d, files = _precomputed(tmp_path / "partial")
    os.replace(files[1], files[1].replace(".array_record", ".partial"))
    with pytest.raises(IncompleteData, match=r"unfinished precompute output \['precomputed-00001-of-00002.partial"):
        check_precomputed(d, files[:1])
    d, files = _precomputed(tmp_path / "truncated")
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[:len(data) // 2])
    with pytest.raises(IncompleteData, match=r"precomputed-00000-of-00002.array_record: holds 0 rows, expected 3"):
        check_precomputed(d, files)
    d, files = _precomputed(tmp_path / "badjson")
    open(os.path.join(d, "precompute.json"), "w").write("{")
    with pytest.raises(IncompleteData, match=r"precompute.json: invalid JSON at line 1"):
        check_precomputed(d, files)


# ----------------------------------------------------------------------------------------------------------------
# verify's exit codes, convert on NaN weights
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.torch_reference import tiny_sd3_transformer
    root = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_transformer("sd35_medium", num_layers=2).save_pretrained(root / "transformer")
    return root / "transformer"


def _rewrite_safetensors(src, dst, edit):
    from safetensors.numpy import load_file, save_file
    shutil_copy = __import__("shutil").copytree
    shutil_copy(src, dst)
    f = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    return str(dst)


def test_verify_tells_could_not_run_from_tolerance_exceeded(tiny_folder, tmp_path, capsys):
    from swd_jax.cli.verify import EXIT_COULD_NOT_RUN, main as verify_main
    missing = _rewrite_safetensors(tiny_folder, tmp_path / "missing", lambda t: t.pop(sorted(t)[0]))
    assert verify_main([missing, "--sizes", "8", "--text-tokens", "7"]) == EXIT_COULD_NOT_RUN == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not run the comparison:") and len(err.splitlines()) == 1, err
    truncated = tmp_path / "truncated"
    __import__("shutil").copytree(tiny_folder, truncated)
    f = truncated / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:2000])
    assert verify_main([str(truncated), "--sizes", "8", "--text-tokens", "7"]) == EXIT_COULD_NOT_RUN


def test_convert_refuses_nan_weights(tiny_folder, tmp_path, capsys):
    from swd_jax.cli.convert import main as convert_main

    def poison(t):
        key = next(k for k in sorted(t) if k.endswith("to_q.weight"))
        t[key] = t[key].copy()
        t[key][0, 0] = np.nan

    bad = _rewrite_safetensors(tiny_folder, tmp_path / "nan", poison)
    assert convert_main([bad, str(tmp_path / "out"), "--no-progress"]) == 2
    assert "weights hold NaN or infinite values, e.g. [\"['transformer_blocks_0']['attn']['to_q']" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "params")


def test_bad_files_are_named_with_their_line(tmp_path):
    from swd_jax.convert.safetensors_reader import SafetensorsFile
    from swd_jax.models.mmdit import MMDiTConfig
    from swd_jax.train.records import read_metainfo
    (tmp_path / "config.json").write_text('{\n  "num_layers": 2,\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json: invalid JSON at line 3 column 3"):
        MMDiTConfig.from_folder(str(tmp_path))
    (tmp_path / "metainfo.csv").write_bytes(b"file_name,prompt\n0.png,a cat\n1.png,caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"metainfo.csv line 3: not UTF-8 text"):
        read_metainfo(str(tmp_path / "metainfo.csv"))
    for name, data in (("huge.safetensors", (10**15).to_bytes(8, "little") + b"{}"),
                       ("garbled.safetensors", (4).to_bytes(8, "little") + b"\xff\xfe{]"),
                       ("short.safetensors", b"\x01")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}: (not a safetensors file|garbled safetensors header)"):
            SafetensorsFile(str(tmp_path / name))


def test_bad_adapter_config_is_named(tmp_path):
    from swd_jax.convert import peft_lora
    (tmp_path / peft_lora.ADAPTER_CONFIG).write_text("{'r': 4}")
    (tmp_path / peft_lora.ADAPTER_WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{peft_lora.ADAPTER_CONFIG}: invalid JSON at line 1 column 2"):
        peft_lora.adapter_files(str(tmp_path))


def test_checksums_match_when_read_back_without_the_original_tree(tmp_path):
    import optax
    params = {"a": np.ones((4, 3), np.float32)}
    state = {"params": params, "opt": optax.adam(1e-3).init(params)}  # namedtuples: orbax reads them back as dicts
    with ck.Checkpointer(str(tmp_path), save_every=1, keep=1) as c:
        c.save(1, state, {"step": 1})
        c.wait_until_finished()
        tree, extra = c.read(1)
    assert extra == {"step": 1}
    np.testing.assert_array_equal(tree["params"]["a"], params["a"])
