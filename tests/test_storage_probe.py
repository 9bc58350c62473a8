import os
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa
from swd_jax import storage

def test_roundtrip(gcs_bucket, tmp_path):
    for root in (gcs_bucket + "/run", str(tmp_path / "run")):
        storage.makedirs(root)
        storage.write_text(storage.join(root, "a", "config.json"), "x")
        assert storage.read_text(storage.join(root, "a", "config.json")) == "x"
        assert storage.isdir(storage.join(root, "a")) and storage.isfile(storage.join(root, "a", "config.json"))
        assert storage.listdir(root) == ["a"]
        storage.move_tree(storage.join(root, "a"), storage.join(root, "b"))
        assert storage.listdir(root) == ["b"], storage.listdir(root)
        s = storage.Staged(storage.join(root, "out"))
        open(os.path.join(s.path, "m.jsonl"), "w").write("1\n")
        s.sync()
        assert storage.read_text(storage.join(root, "out", "m.jsonl")) == "1\n"
        loc = storage.local_copy(storage.join(root, "b"))
        assert open(os.path.join(loc, "config.json")).read() == "x"
