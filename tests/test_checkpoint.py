"""Orbax checkpointing: interval + keep-last-K, exact restore (optax namedtuples), sharded restore, strictness."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swd_jax.convert import orbax_params as params_io
from swd_jax.train import checkpoint as ck
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

MESH = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _tx():
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(5e-6, weight_decay=1e-2))


def _state(seed: int):
    """A tiny SwD-shaped train state: two LoRAs, a head, two optax states, step and key data."""
    r = np.random.default_rng(seed)
    lora = lambda: {"to_q": {"a": jnp.asarray(r.normal(size=(8, 4)), jnp.float32),
                             "b": jnp.asarray(r.normal(size=(4, 8)), jnp.float32)}}
    student, fake = lora(), lora()
    head = {"ln": {"scale": jnp.ones((8,), jnp.bfloat16)}, "dense": {"kernel": jnp.asarray(r.normal(size=(8, 1)))}}
    tx = _tx()
    opt_g = tx.init(student)
    opt_f = tx.init({"lora": fake, "head": head})
    # make the optimizer states non-trivial
    opt_g = tx.update(jax.tree.map(jnp.ones_like, student), opt_g, student)[1]
    return {"student_lora": student, "fake_lora": fake, "disc_head": head, "opt_g": opt_g, "opt_f": opt_f,
            "step": jnp.int32(seed), "rng": jax.random.key_data(jax.random.key(seed))}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_interval_keep_last_k_and_exact_restore(tmp_path):
    with ck.Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2) as c:
        assert c.restore_latest(params_io.abstract_like(_state(0))) is None
        saved = [c.save(s, _state(s), {"data": {"position": 6 * s}, "config": {"lr": 5e-6}}) for s in range(7)]
        assert saved == [True, False, True, False, True, False, True]
        c.wait_until_finished()
        assert c.all_steps() == [4, 6] and c.latest_step() == 6
        assert c.save(7, _state(7), force=True)  # e.g. the final step
        state, extra = c.restore_latest(params_io.abstract_like(_state(0)))
    _assert_tree_equal(state, _state(7))
    assert extra == {}
    # a fresh manager on the same directory (a restarted job) sees the kept steps
    with ck.Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2) as c:
        assert c.all_steps() == [6, 7]
        state, extra = c.restore(6, params_io.abstract_like(_state(0)))
    _assert_tree_equal(state, _state(6))
    assert extra == {"data": {"position": 36}, "config": {"lr": 5e-6}}
    adam = state["opt_g"][1][0]  # chain -> (clip state, adamw chain -> (ScaleByAdamState, ...))
    assert type(adam) is optax.ScaleByAdamState and type(state["opt_g"]) is tuple
    assert float(np.abs(np.asarray(adam.mu["to_q"]["a"])).sum()) > 0


def test_restore_into_shardings_on_8_devices(tmp_path):
    state = _state(3)  # saved from single-device arrays
    with ck.Checkpointer(str(tmp_path / "c"), save_every=1, keep=1) as c:
        c.save(3, state)
        spec = lambda x: P(None, "model") if x.ndim == 2 and x.shape[1] % 4 == 0 else P()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(MESH, spec(x))), state)
        restored, _ = c.restore_latest(abstract)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(restored)):
        assert r.sharding == a.sharding
    assert restored["student_lora"]["to_q"]["b"].addressable_shards[0].data.shape == (4, 2)
    _assert_tree_equal(restored, state)


def test_async_save_is_safe_to_donate_then_restores(tmp_path):
    state = jax.device_put(_state(5), NamedSharding(MESH, P()))
    expected = jax.tree.map(np.asarray, state)
    with ck.Checkpointer(str(tmp_path / "c"), save_every=1, keep=3, async_save=True) as c:
        assert c.save(5, state, {"position": 30})
        for x in jax.tree.leaves(state):  # what a donated train step does to the buffers
            x.delete()
        c.wait_until_finished()
        assert not [d for d in os.listdir(c.directory) if "tmp" in d]
        restored, extra = c.restore_latest(params_io.abstract_like(_state(0)))
    _assert_tree_equal(restored, expected)
    assert extra == {"position": 30}


def test_unfinished_temporary_directory_is_ignored(tmp_path):
    d = tmp_path / "c"
    with ck.Checkpointer(str(d), save_every=1, keep=3) as c:
        c.save(1, _state(1))
    (d / "2.orbax-checkpoint-tmp-1234567").mkdir()  # a save that crashed before its rename
    (d / "2.orbax-checkpoint-tmp-1234567" / "junk").write_text("partial")
    with ck.Checkpointer(str(d), save_every=1, keep=3) as c:
        assert c.latest_step() == 1
        state, _ = c.restore_latest(params_io.abstract_like(_state(0)))
        c.save(3, _state(3))  # a save first waits for the (background) removal of stale temporaries
    _assert_tree_equal(state, _state(1))
    assert sorted(os.listdir(d)) == ["1", "3"]


def test_mismatch_raises_naming_the_keys(tmp_path):
    with ck.Checkpointer(str(tmp_path / "c"), save_every=1, keep=1) as c:
        c.save(1, _state(1))
        good = params_io.abstract_like(_state(0))

        shape = jax.tree.map(lambda x: x, good)
        shape["student_lora"]["to_q"]["a"] = jax.ShapeDtypeStruct((8, 5), jnp.float32)
        with pytest.raises(ValueError, match=r"shape/dtype differ: student_lora/to_q/a: stored \(8, 4\) float32"):
            c.restore_latest(shape)

        dtype = jax.tree.map(lambda x: x, good)
        dtype["disc_head"]["ln"]["scale"] = jax.ShapeDtypeStruct((8,), jnp.float32)
        with pytest.raises(ValueError, match=r"disc_head/ln/scale: stored \(8,\) bfloat16, expected \(8,\) float32"):
            c.restore_latest(dtype)

        struct = jax.tree.map(lambda x: x, good)
        del struct["fake_lora"]["to_q"]["b"]
        struct["fake_lora"]["to_k"] = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
        with pytest.raises(ValueError, match=r"(?s)missing from the checkpoint: fake_lora/to_k/a.*"
                                             r"in the checkpoint but not expected: fake_lora/to_q/b"):
            c.restore_latest(struct)

        with pytest.raises(TypeError, match="typed PRNG keys at \\['rng'\\]"):
            c.save(2, {**_state(2), "rng": jax.random.key(0)})
        with pytest.raises(TypeError, match="JSON-serializable"):
            c.save(3, _state(3), {"bad": object()})
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 9"):
            c.restore(9, good)


def test_save_and_load_params(tmp_path):
    params = {"transformer_blocks": [{"attn": {"to_q": {"kernel": jnp.arange(12.0).reshape(3, 4),
                                                        "bias": jnp.zeros((4,), jnp.bfloat16)}}}],
              "pos_embed": jnp.ones((2, 4), jnp.float16)}
    path = str(tmp_path / "base")
    params_io.save_params(path, params)
    with pytest.raises(FileExistsError):
        params_io.save_params(path, params)
    abstract = jax.eval_shape(lambda: params)  # no shardings -> replicated over all devices
    loaded = params_io.load_params(path, abstract)
    _assert_tree_equal(loaded, params)
    assert loaded["pos_embed"].sharding.is_fully_replicated and len(loaded["pos_embed"].sharding.device_set) == 8
    abstract["pos_embed"] = jax.ShapeDtypeStruct((2, 5), jnp.float16)
    with pytest.raises(ValueError, match=r"pos_embed: stored \(2, 4\) float16, expected \(2, 5\) float16"):
        params_io.load_params(path, abstract)


def test_checkpoints_in_a_gs_bucket_save_restore_and_set_aside(gcs_bucket, capsys):
    from swd_jax import storage
    d = f"{gcs_bucket}/run/checkpoints/"
    with ck.Checkpointer(d, save_every=1, keep=3) as c:
        assert c.directory == f"{gcs_bucket}/run/checkpoints"  # kept as given (no abspath), trailing / dropped
        for s in (1, 2, 3):
            c.save(s, _state(s), {"step": s})
        c.wait_until_finished()
        assert c.all_steps() == [1, 2, 3]
        assert c.quarantine(3, "iteration 4 diverged") == f"{c.directory}/3.nonfinite"
        assert c.all_steps() == [1, 2]
    assert storage.read_text(f"{c.directory}/3.nonfinite/REASON.txt").startswith("iteration 4 diverged")
    storage.remove(f"{c.directory}/2/extra/metadata")  # a broken step 2: set aside, step 1 restored
    with ck.Checkpointer(d, save_every=1, keep=3) as c:
        state, extra = c.restore_latest(params_io.abstract_like(_state(0)))
        assert extra == {"step": 1} and c.restored_step == 1 and c.all_steps() == [1]
        assert c.set_aside_steps() == ["2.corrupt", "3.nonfinite"]
        c.save(2, _state(2), {"step": 2})  # the step can be saved again
    _assert_tree_equal(state, _state(1))
    assert "step 2 is broken" in capsys.readouterr().err
    assert storage.isfile(f"{c.directory}/2.corrupt/REASON.txt") and storage.isdir(f"{c.directory}/2")
