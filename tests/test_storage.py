"""The file layer: the same calls give the same results on a local folder and on gs:// (the emulator)."""
import os

import pytest

from swd_jax import storage
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401


def test_local_and_gcs_behave_alike(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SWD_GCS_CACHE", str(tmp_path / "cache"))
    for root in (gcs_bucket + "/run", str(tmp_path / "run")):
        storage.makedirs(root)
        storage.write_text(storage.join(root, "a", "config.json"), "x")
        assert storage.read_text(storage.join(root, "a", "config.json")) == "x"
        assert storage.isdir(storage.join(root, "a")) and storage.isfile(storage.join(root, "a", "config.json"))
        assert not storage.exists(storage.join(root, "nothing")) and storage.listdir(storage.join(root, "no")) == []
        assert storage.listdir(root) == ["a"]
        storage.move_tree(storage.join(root, "a"), storage.join(root, "b"))
        assert storage.listdir(root) == ["b"], storage.listdir(root)
        staged = storage.Staged(storage.join(root, "out"))
        with open(os.path.join(staged.path, "m.jsonl"), "w") as f:
            f.write("1\n")
        staged.sync()
        assert storage.read_text(storage.join(root, "out", "m.jsonl")) == "1\n"
        local = storage.local_copy(storage.join(root, "b"))
        assert open(os.path.join(local, "config.json")).read() == "x"
        storage.remove_tree(storage.join(root, "b"))
        assert not storage.exists(storage.join(root, "b"))


def test_bad_paths_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.resolve("gs://")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        storage.makedirs(str(tmp_path / "file"))
