"""`swd-generate --shard-size`: the teacher's training set as a multi-process, resumable job (swd_jax.cli.generate_set).

2 processes x 4 CPU devices generate 24 prompts with the tiny pipeline (teacher, 2 Euler steps with CFG); process
1 is killed (SIGKILL) right after its first shard's manifest; a complete shard's PNG is then garbled and another's
deleted; the rerun completes the set, redoing exactly those. The PNGs are bitwise equal to a 1-process x 8-device
run's, metainfo.csv has every prompt once in order, and swd-precompute reads the folder as it is; process 0 sums the
run up across processes. A set on gs:// (the Cloud Storage emulator) is made, rerun (verified, skipped) and read
back. Bad inputs end in one `error:` line and exit 2.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from tests.test_prompt_encoding import T5_LEN, sd3  # noqa: F401  (module-scoped fixture)
from tests.test_readme_journey import complete_pipeline, jax_cache_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "low", "tower", "lower", "the", "red"]
PROMPTS = [f"{WORDS[i % 6]} {WORDS[(i // 6) % 6]} tower {i}" for i in range(24)]
SHARD = 4
# Process 1 of the killed run: SIGKILL itself right after writing its first shard manifest (a deterministic kill).
LAUNCH = """
import os, signal, sys
from swd_jax import storage
from swd_jax.cli import generate
if os.environ.get("KILL_AFTER_FIRST_SHARD") == os.environ.get("SWD_PROCESS_ID"):
    write = storage.write_text
    def write_then_die(path, text):
        write(path, text)
        if "/.shards/" in path and not path.endswith("set.json"):
            os.kill(os.getpid(), signal.SIGKILL)
    storage.write_text = write_then_die
sys.exit(generate.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pipe_root(sd3):  # noqa: F811
    complete_pipeline(sd3[1])
    return str(sd3[1])


def gen_args(root: str, prompts: str, out: str) -> list[str]:
    return ["--model", root, "--sampler", "teacher", "--steps", "2", "--size", "8", "--prompts", prompts,
            "--shard-size", str(SHARD), "--batch-per-device", "1", "--max-sequence-length", str(T5_LEN),
            "--out", out, "--no-progress"]


def launch(args: list[str], processes: int, devices: int, tmp_path, kill: int | None = None):
    """Start `processes` generate processes of `devices` CPU devices each; [(exit code, output)]."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SWD_COMPILE_CACHE=jax_cache_dir(),
               SWD_PEER_TIMEOUT_S="3", SWD_SUPERVISED="1", KILL_AFTER_FIRST_SHARD=str(kill),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    layout = lambda i: (["--coordinator", f"localhost:{port}", "--num_processes", str(processes), "--process_id",
                         str(i)] if processes > 1 else [])
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCH, *args, *layout(i)], cwd=str(tmp_path),
                              env={**env, "SWD_PROCESS_ID": str(i)} if processes > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


def test_two_processes_killed_and_rerun_equal_one_process(pipe_root, tmp_path, capsys):
    from swd_jax.train.metainfo import read_metainfo
    from swd_jax.train.precompute import precompute
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    two, one = tmp_path / "two", tmp_path / "one"
    t0 = time.perf_counter()
    killed = launch(gen_args(pipe_root, str(prompts), str(two)), 2, 4, tmp_path, kill=1)
    t_killed = time.perf_counter() - t0
    assert killed[1][0] == -9, killed[1][1][-2000:]
    assert killed[0][0] == 1 and "error: stopping: process 1 stopped responding" in killed[0][1], killed[0][1][-2000:]
    assert not (two / "metainfo.csv").exists()
    done = sorted(p.name for p in (two / ".shards").glob("0*.json"))
    assert 1 <= len(done) < 6, done  # process 1 wrote one shard; process 0 its three at most
    first = json.loads((two / ".shards" / done[0]).read_text())["images"]
    garbled = two / first[0]["file_name"]
    data = bytearray(garbled.read_bytes())
    data[-20] ^= 0xFF  # same size: only the sha256 tells
    garbled.write_bytes(bytes(data))
    if len(done) > 1:
        (two / json.loads((two / ".shards" / done[1]).read_text())["images"][1]["file_name"]).unlink()

    t0 = time.perf_counter()
    rerun = launch(gen_args(pipe_root, str(prompts), str(two)), 2, 4, tmp_path)
    t_rerun = time.perf_counter() - t0
    assert [rc for rc, _ in rerun] == [0, 0], [o[-2000:] for _, o in rerun]
    out = rerun[0][1] + rerun[1][1]
    assert f"shard {int(done[0][:5])} " in out and "does not match its sha256" in out, out
    assert "set complete: 24 images and metainfo.csv" in rerun[0][1]
    assert "images/s per chip" in rerun[0][1] and "images/s per chip" in rerun[1][1]
    redone = min(len(done), 2)  # the garbled shard and, if there, the one missing an image
    made = 24 - SHARD * (len(done) - redone)  # the rerun's images: the shards without a manifest and those redone
    assert f"all 2 processes: {made} images in " in rerun[0][1] and "per chip (8 chips;" in rerun[0][1], rerun[0][1]

    t0 = time.perf_counter()
    single = launch(gen_args(pipe_root, str(prompts), str(one)), 1, 8, tmp_path)
    t_single = time.perf_counter() - t0
    assert single[0][0] == 0, single[0][1][-2000:]
    names = [f"{n:06d}.png" for n in range(24)]
    assert sorted(p.name for p in two.glob("*.png")) == names
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    rows = read_metainfo(str(two / "metainfo.csv"))
    assert list(rows) == [(f"{n:06d}.png", p) for n, p in enumerate(PROMPTS)]
    assert (two / "metainfo.csv").read_bytes() == (one / "metainfo.csv").read_bytes()

    import jax
    counts = precompute(pipe_root, str(two), str(tmp_path / "pre"), (4, 8), shard_size=8, dtype="float32",
                        param_dtype="float32", store_dtype="float32", devices=jax.devices()[:1], progress=False,
                        max_sequence_length=T5_LEN)
    assert sum(1 for _ in (tmp_path / "pre").glob("*.array_record")) == 3, counts
    with capsys.disabled():
        print(f"\nwall time: killed 2-process run {t_killed:.1f} s, rerun {t_rerun:.1f} s, 1-process run "
              f"{t_single:.1f} s")

    # A complete set rerun: everything verified, nothing generated, the same metainfo.
    rc, err, out = run_cli(gen_args(pipe_root, str(prompts), str(one)), capsys)
    assert rc == 0 and "0 images (0 shards" in out and "6 complete shards verified" in out, (err, out)
    assert (two / "metainfo.csv").read_bytes() == (one / "metainfo.csv").read_bytes()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of swd-generate run in this process."""
    from swd_jax.cli.generate import main
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def test_bad_inputs_are_one_line_errors(pipe_root, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    rc, err, _ = run_cli(gen_args(pipe_root, str(tmp_path / "absent.txt"), str(tmp_path / "a")), capsys)
    assert rc == 2 and err.strip().startswith("error: prompt file") and "does not exist" in err, err
    prompts.write_text("\n\n")
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(tmp_path / "a")), capsys)
    assert rc == 2 and err.strip() == "error: no prompts: give --prompt TEXT or --prompts FILE", err
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(tmp_path / "a")) + ["--shard-size", "0"], capsys)
    assert rc == 2 and "--shard-size must be a positive integer" in err, err
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text('prompt\n"two\nlines"\n')
    rc, err, _ = run_cli(gen_args(pipe_root, str(csv_file), str(tmp_path / "a")), capsys)
    assert rc == 2 and "spans several lines" in err, err
    prompts.write_text("a low tower\nthe red tower\n")
    out = tmp_path / "set"
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(out)) + ["--limit", "1"], capsys)
    assert rc == 0 and (out / "metainfo.csv").read_text() == "file_name,prompt\n000000.png,a low tower\n", err
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(out)) + ["--limit", "1", "--seed", "5"], capsys)
    assert rc == 2 and "holds another image set" in err and "seed 0 there, 5 here" in err, err
    assert len(err.strip().splitlines()) == 1
    prompts.write_text("the red tower\n")
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(out)), capsys)
    assert rc == 2 and "'a low tower' there, 'the red tower' here" in err, err
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(out)) + ["--steps", "3"], capsys)
    assert rc == 2 and "settings.sigmas" in err, err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metainfo.csv").write_text("file_name,prompt\nx.png,a\n")
    rc, err, _ = run_cli(gen_args(pipe_root, str(prompts), str(foreign)), capsys)
    assert rc == 2 and "did not write" in err, err


def test_set_on_gcs_made_rerun_and_read_back(pipe_root, gcs_bucket, tmp_path, capsys):  # noqa: F811
    """1 process, --out gs://: PNGs, manifests and metainfo.csv land in the bucket; a rerun verifies and skips."""
    import csv
    import io

    from PIL import Image

    from swd_jax import storage
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:6]) + "\n")
    out = f"{gcs_bucket}/set"
    t0 = time.perf_counter()
    rc, err, stdout = run_cli(gen_args(pipe_root, str(prompts), out), capsys)
    t_made = time.perf_counter() - t0
    assert rc == 0 and "6 images (2 shards" in stdout, (err, stdout)
    assert f"set complete: 6 images and metainfo.csv in {out}" in stdout, stdout
    names = [f"{n:06d}.png" for n in range(6)]
    assert sorted(n for n in storage.listdir(out) if n.endswith(".png")) == names
    assert sorted(storage.listdir(f"{out}/.shards")) == ["00000.json", "00001.json", "set.json"]
    assert Image.open(io.BytesIO(storage.read_bytes(f"{out}/{names[5]}"))).size == (16, 16)
    t0 = time.perf_counter()
    rc, err, stdout = run_cli(gen_args(pipe_root, str(prompts), out), capsys)
    t_rerun = time.perf_counter() - t0
    assert rc == 0 and "0 images (0 shards" in stdout and "2 complete shards verified" in stdout, (err, stdout)
    rows = list(csv.reader(io.StringIO(storage.read_text(f"{out}/metainfo.csv"), newline="")))
    assert rows == [["file_name", "prompt"]] + [[n, p] for n, p in zip(names, PROMPTS[:6])]
    with capsys.disabled():
        print(f"\nwall time on gs://: set made {t_made:.1f} s, rerun {t_rerun:.1f} s")
