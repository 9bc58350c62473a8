"""Hub ids wherever a folder is taken, offline: a Hugging Face cache laid out as the Hub lays it out
($HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/... + refs/main) holding a tiny SD3 pipeline and a PEFT
adapter; swd-convert and swd-generate resolve ORG/NAME through it; unknown ids and non-ids are one line, at once.
Also: swd-precompute refuses scales swd-train would refuse; reading a training checkpoint's student logs no
orbax `_CHECKPOINT_METADATA` warning."""
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import pytest

from tests.test_prompt_encoding import T5_LEN, sd3  # noqa: F401  (module-scoped fixture)
from tests.test_readme_journey import complete_pipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _publish(hf_home, repo: str, folder) -> str:
    """Put `folder` in the Hub cache under `repo` at COMMIT (refs/main -> COMMIT); returns the snapshot path."""
    store = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = store / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (store / "refs").mkdir(parents=True, exist_ok=True)
    (store / "refs" / "main").write_text(COMMIT)
    return str(snapshot)


@pytest.fixture(scope="module")
def hub(sd3, tmp_path_factory):  # noqa: F811
    """$HF_HOME with org/tiny-sd3 (a pipeline) and org/tiny-swd (a PEFT adapter), offline."""
    from tests.test_storage_tools import _run_with_student_peft
    pipe = sd3[1]
    complete_pipeline(pipe)
    run = _run_with_student_peft(tmp_path_factory.mktemp("run"), pipe / "transformer")
    home = tmp_path_factory.mktemp("hf_home")
    snapshot = _publish(home, "org/tiny-sd3", pipe)
    _publish(home, "org/tiny-swd", run / "student_peft")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("HF_HUB_CACHE", raising=False)
    yield snapshot
    mp.undo()


def test_convert_and_generate_take_hub_ids(hub, tmp_path, capsys):
    from swd_jax.cli.convert import main as convert_main
    from swd_jax.convert.converted import conversion_source
    from swd_jax.cli.generate import main as generate_main
    assert convert_main(["org/tiny-sd3", str(tmp_path / "ckpt"), "--no-progress"]) == 0, capsys.readouterr().err
    assert conversion_source(str(tmp_path / "ckpt")) == os.path.join(hub, "transformer")
    rc = generate_main(["--model", "org/tiny-sd3", "--lora", "org/tiny-swd", "--prompt", "a low tower",
                        "--scales", "4,8", "--sigmas", "1.0,0.5,0.0", "--out", str(tmp_path / "out"),
                        "--max-sequence-length", str(T5_LEN), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "images.json").read_text())[0]
    assert record["model"] == "org/tiny-sd3" and record["lora"].startswith(os.environ["HF_HOME"])
    assert "_CHECKPOINT_METADATA" not in err


@pytest.mark.parametrize("argv,message", [
    (["convert", "org/nope", "DST"], r"error: SRC org/nope: no such folder, and Hub id org/nope is not in the local "
                                     r"Hugging Face cache \(.*/hub\) and HF_HUB_OFFLINE=1 is set"),
    (["convert", "nope", "DST"], r"error: nope: no such folder, and not a Hub id \(ORG/NAME\)"),
    (["evaluate", "--clip", "clip_nope"], r"error: clip_nope: no such folder, and not a Hub id \(ORG/NAME\)"),
    (["evaluate", "--clip", "org/nope@v2"], r"error: CLIP model folder org/nope@v2: no such folder, and Hub id "
                                            r"org/nope@v2 is not in the local Hugging Face cache"),
])
def test_unknown_names_are_one_line_at_once(hub, tmp_path, capsys, argv, message):
    import re

    from PIL import Image

    from swd_jax.cli import evaluate
    from swd_jax.cli.convert import main as convert_main
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "images.json").write_text(json.dumps([{"file": "0.png", "prompt": "x", "seed": 0}]))
    command, args = argv[0], [str(tmp_path / "dst") if a == "DST" else a for a in argv[1:]]
    t0 = time.perf_counter()
    if command == "convert":
        rc = convert_main(args)
    else:
        rc = evaluate.main(["--images", str(tmp_path), *args])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.match(message, err), err
    assert elapsed < 2.0


def test_precompute_refuses_scales_training_refuses(hub, tmp_path, capsys):
    from swd_jax.cli.precompute import main as precompute_main
    rc = precompute_main(["--model", "org/tiny-sd3", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                          "--scales", "4,9,40"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --scales 4,9,40: swd-train would refuse them: schedule scales "
                                      "(4, 9, 40) do not fit this model: [9, 40]"), err
    assert not (tmp_path / "out").exists()


def test_reading_a_training_checkpoint_logs_no_metadata_warning(tmp_path, caplog):
    import orbax.checkpoint as ocp

    from swd_jax.convert.orbax_params import load_params, tree_metadata
    mgr = ocp.CheckpointManager(str(tmp_path), item_names=("state",))  # as the trainer writes <step>/state
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"student": {"a": jnp.ones(3)}})))
    mgr.wait_until_finished()
    mgr.close()
    with caplog.at_level(logging.WARNING):
        stored = tree_metadata(str(tmp_path / "1" / "state"))
        got = load_params(str(tmp_path / "1" / "state"),
                          jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored))
    assert float(got["student"]["a"].sum()) == 3.0
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()], caplog.text
