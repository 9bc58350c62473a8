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
        with pytest.raises(FloatingPointError, match=r"step 2: non-finite values in \[\"\['opt'\]\['nu'\]\"\]; "
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
