"""The teacher's training set: `swd-generate --shard-size N` over a prompt file, on one process or a whole slice.

    swd-generate --model /models/my-sd35m --sampler teacher --dtype bfloat16 --prompts prompts.txt \
        --shard-size 1000 --out gs://my-data/teacher_set        # every host of a slice runs the same command

Output, local or gs:// (through `swd_jax.storage`), exactly the layout `swd-precompute --data` reads:
- `OUT/000000.png ...`: image n of prompt n // num_per_prompt, seed `seed + n` (its noise drawn from that seed
  alone: the set does not depend on the process count, the batch or interruptions);
- `OUT/metainfo.csv`: `file_name,prompt`, one row per image in image order, written by process 0 once every shard
  is complete (its presence marks a finished set);
- `OUT/.shards/set.json`: what the set is (image count, prompts' sha256, seed, shard size and every sampler
  setting); a rerun into a folder holding another set is refused naming the difference;
- `OUT/.shards/<shard>.json`, one per complete shard of N images (written atomically after its PNGs): each
  image's file name, prompt, seed, size and sha256.

Processes: the layout of `swd_jax.train.distributed` (flags, SWD_* variables, or a TPU VM's own). The shards
without a manifest are dealt round-robin over the processes (so a rerun after a kill spreads the rest evenly);
each process verifies the manifested shards i with i % P == its id (`--verify full`: every PNG's sha256, the
default; `size`: sizes only, for large gs:// sets) and redoes one that fails, with a warning naming it; a shard
without a manifest (partial) is redone whole. Batches of `--batch-per-device` x local devices are data parallel
over the local devices, the last one padded to the same compiled shape; on a TPU the batch per chip defaults to
the TPU sampling plan's (`plan_batch`: benchmarks/tpu_sampling_plan.json, for the attention the pipeline runs:
splash on a TPU). Process 0 shows a progress bar (its own share: images/s and ETA, compile excluded) and every
process prints a summary: images, seconds, images/s per chip; process 0 then the whole run's: the images of the
manifests written during the run (each records its unix time, process, attention and block scan) over the run's
wall time (compiling and verifying included), per second and per chip of all processes.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time

import numpy as np

from swd_jax import storage

SHARDS = ".shards"
SET_FILE = "set.json"
METAINFO = "metainfo.csv"
PLAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                    "tpu_sampling_plan.json")
BARRIER_S = 7 * 24 * 3600  # processes wait for each other's shards: uneven shares may take hours
DEVICE_GENERATIONS = {"TPU v5p": "v5p", "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU v4": "v4"}
PLAN_MODELS = {24: "medium", 38: "large", 57: "flux"}  # blocks of the full model -> the plan's model name
PLAN_ATTENTION = {"splash": "splash", "splash_fused": "splash"}  # the pipeline's kernel -> the plan's (no backward)


def file_name(n: int) -> str:
    return f"{n:06d}.png"


def shard_name(i: int) -> str:
    return f"{i:05d}.json"


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """The set: every image's prompt and seed, cut into shards of `shard_size`; `settings`: the sampler's."""
    prompts: tuple[str, ...]
    num_per_prompt: int
    seed: int
    shard_size: int
    settings: dict

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_per_prompt

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def shard(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.total))

    def row(self, n: int) -> dict:
        from swd_jax.eval.prompts import sample_seed
        return {"file_name": file_name(n), "prompt": self.prompts[n // self.num_per_prompt],
                "seed": sample_seed(self.seed, n)}

    def identity(self) -> dict:
        digest = hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()
        return {"images": self.total, "prompts": len(self.prompts), "prompts_sha256": digest,
                "num_per_prompt": self.num_per_prompt, "seed": self.seed, "shard_size": self.shard_size,
                "settings": self.settings}


def check_prompts(prompts: list[str]) -> None:
    """metainfo.csv holds one line per image: a prompt with a line break is refused (precompute would refuse it)."""
    for i, p in enumerate(prompts):
        if "\n" in p or "\r" in p:
            raise ValueError(f"prompt {i} spans several lines ({p[:40]!r}...): metainfo.csv takes one line per prompt")


def _differences(there: dict, here: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(there) | set(here)):
        a, b = there.get(k), here.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} there, {b!r} here")
    return out


def check_set(out: str, image_set: ImageSet) -> bool:
    """Refuse an OUT holding another set (naming the difference) or a metainfo.csv not made here; write set.json
    when absent. Returns whether OUT held this set already."""
    path = storage.join(out, SHARDS, SET_FILE)
    here = image_set.identity()
    if storage.isfile(path):
        there = json.loads(storage.read_text(path))
        diff = _differences(there, here)
        if diff:
            first = _first_other_prompt(out, image_set) if "prompts_sha256" in " ".join(diff) else None
            raise ValueError(f"{out} holds another image set ({'; '.join(diff[:3])}{first or ''}): give another "
                             "--out, or the same prompts, seed, model and settings to resume it")
        return True
    if storage.isfile(storage.join(out, METAINFO)):
        raise ValueError(f"{out} holds a {METAINFO} that swd-generate --shard-size did not write (no {SHARDS}/"
                         f"{SET_FILE}): give an empty or new --out")
    storage.write_text(path, json.dumps(here, indent=1, ensure_ascii=False))
    return False


def _first_other_prompt(out: str, image_set: ImageSet) -> str | None:
    """'; first at image N: ... there, ... here' from the shards written, if one shows the prompt that differs."""
    for name in sorted(list_manifests(out).values()):
        try:
            rows = json.loads(storage.read_text(storage.join(out, SHARDS, name)))["images"]
        except (ValueError, KeyError, OSError):
            continue
        for r in rows:
            n = int(r["file_name"].split(".")[0])
            if n < image_set.total and r["prompt"] != image_set.row(n)["prompt"]:
                return f"; first at image {n}: {r['prompt'][:40]!r} there, {image_set.row(n)['prompt'][:40]!r} here"
    return None


def list_manifests(out: str) -> dict[int, str]:
    """{shard index: manifest file name} of the shards marked complete."""
    folder = storage.join(out, SHARDS)
    if not storage.isdir(folder):
        return {}
    names = [n for n in storage.listdir(folder) if n.endswith(".json") and n[:-5].isdigit()]
    return {int(n[:-5]): n for n in names}


def verify_shard(out: str, image_set: ImageSet, i: int, full: bool, sizes: dict[str, int]) -> str | None:
    """Why shard i's manifest or images are not the set's (None: they are). `sizes`: OUT's file sizes."""
    try:
        manifest = json.loads(storage.read_text(storage.join(out, SHARDS, shard_name(i))))
        rows = manifest["images"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest ({type(e).__name__}: {e})"
    want = [image_set.row(n) for n in image_set.shard(i)]
    if [{k: r.get(k) for k in ("file_name", "prompt", "seed")} for r in rows] != want:
        return "its manifest lists other images"
    for r in rows:
        name = r["file_name"]
        got = sizes.get(name)
        if got != r["size"]:
            return f"{name} is missing" if got is None else f"{name} is {got} bytes, not {r['size']}"
        if full and hashlib.sha256(storage.read_bytes(storage.join(out, name))).hexdigest() != r["sha256"]:
            return f"{name} does not match its sha256"
    return None


def file_sizes(out: str) -> dict[str, int]:
    """{file name: bytes} of OUT's PNGs (one listing)."""
    if storage.is_remote(out):
        fs = storage._fs()
        key = out[len(storage.GCS):]
        return {os.path.basename(d["name"]): int(d["size"]) for d in fs.ls(key, detail=True)
                if d["name"].endswith(".png")}
    return {e.name: e.stat().st_size for e in os.scandir(out) if e.name.endswith(".png")} if os.path.isdir(out) else {}


def png_bytes(image_HW3: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_HW3).save(buf, format="PNG")
    return buf.getvalue()


def plan_batch(pipe, attention: str | None = None) -> tuple[int, str]:
    """(images per chip, where from): the TPU sampling plan's largest compiled batch (within its largest batch with
    10 % headroom) for this model on this TPU generation with the attention the pipeline runs
    (`pipe.attention_impl`: splash on a TPU by default; benchmarks/tpu_sampling_plan.json), else 1."""
    import jax
    attention = attention or pipe.attention_impl
    attention = PLAN_ATTENTION.get(attention, attention)
    gen = DEVICE_GENERATIONS.get(jax.devices()[0].device_kind)
    model = PLAN_MODELS.get(pipe.backbone.num_blocks(pipe.cfg))
    if gen is None or model is None or not os.path.isfile(PLAN):
        return 1, "default: no TPU sampling plan for this model and device"
    with open(PLAN) as f:
        plans = json.load(f)
    suffix = "" if attention == "splash" else f"/attention={attention}"
    # The largest batch the plan compiled, within the one it says fits: the fit is a line through two small
    # batches and leaves out the VAE decoder (1024 px, the whole batch at once); images/s is flat beyond a few.
    fits = [min(p["max_batch_per_chip_10pct_headroom"],
                max(r["batch_per_chip"] for r in p["rows"] if r["blocks"] == p["full_blocks"]))
            for k, p in plans.items()
            if k.startswith(f"{model}@{gen}:") and k[len(k.split("/")[0]):] == suffix
            and p.get("max_batch_per_chip_10pct_headroom")]
    if not fits:
        return 1, f"default: {PLAN} has no {model} plan for {gen} with {attention} attention"
    return min(fits), (f"the TPU sampling plan for {model} on {gen}, {attention} attention: the largest batch it "
                       "compiled")


def generate_set(pipe, sampler, prompts: list[str], out: str, *, seed: int = 0, num_per_prompt: int = 1,
                 shard_size: int = 1000, batch_per_device: int | None = None, verify: str = "full",
                 progress: bool = True, log=print) -> dict:
    """Make (or complete) the image set in `out` with this process's share; returns this process's figures."""
    import jax

    from swd_jax.train import distributed
    if shard_size < 1:
        raise ValueError(f"--shard-size must be a positive integer, got {shard_size}")
    if verify not in ("full", "size"):
        raise ValueError(f"--verify {verify!r}: choose full or size")
    check_prompts(prompts)
    p, n_proc = jax.process_index(), jax.process_count()
    image_set = ImageSet(tuple(prompts), num_per_prompt, seed, shard_size, pipe.settings(sampler))
    # the manifests written after this instant are this run's (no process writes one before the barrier below)
    run_start, run_t0 = time.time(), time.perf_counter()
    if p == 0:
        check_set(out, image_set)
        storage.remove(storage.join(out, METAINFO))  # written again once every shard is complete
    done = list_manifests(out)  # before the barrier: nobody writes a manifest until every process has listed
    distributed.barrier("generate_set/listed", timeout_s=BARRIER_S)
    if p != 0:
        check_set(out, image_set)
    missing = [i for i in range(image_set.num_shards) if i not in done]
    mine = missing[p::n_proc]
    checked = [i for i in sorted(done) if i < image_set.num_shards and i % n_proc == p]
    sizes = file_sizes(out) if checked else {}
    t0 = time.perf_counter()
    for i in checked:
        why = verify_shard(out, image_set, i, verify == "full", sizes)
        if why is not None:
            log(f"WARNING: shard {i} ({image_set.shard(i).start}-{image_set.shard(i).stop - 1}) is redone: {why}",
                file=sys.stderr)
            mine.append(i)
    verify_s = time.perf_counter() - t0
    if batch_per_device is None:
        batch_per_device, source = plan_batch(pipe)
        if p == 0:
            log(f"{batch_per_device} images per chip ({source})", file=sys.stderr)
    figures = _generate(pipe, sampler, image_set, out, sorted(mine), batch_per_device, progress and p == 0)
    figures.update(verified=len(checked), verify_s=verify_s, redone=len(mine) - len(missing[p::n_proc]))
    distributed.barrier("generate_set/done", timeout_s=BARRIER_S)
    if p == 0:
        figures["set_images"], run_images = write_metainfo(out, image_set, since=run_start)
        figures.update(run_images=run_images, run_seconds=time.perf_counter() - run_t0,
                       run_chips=jax.device_count(), processes=n_proc)
    return figures


def _generate(pipe, sampler, image_set: ImageSet, out: str, shards: list[int], batch_per_device: int,
              progress: bool) -> dict:
    """Sample the images of `shards`, write their PNGs (a thread pool) and each shard's manifest when complete."""
    from tqdm.auto import tqdm
    indices = [n for i in shards for n in image_set.shard(i)]
    left = {i: len(image_set.shard(i)) for i in shards}
    rows: dict[int, dict] = {}
    import jax
    chips, process = pipe.num_devices, jax.process_index()
    batch = batch_per_device * chips
    pool = concurrent.futures.ThreadPoolExecutor(8)
    pending: list[tuple[int, concurrent.futures.Future]] = []

    def write(n: int, img: np.ndarray) -> dict:
        data = png_bytes(img)
        storage.write_bytes(storage.join(out, file_name(n)), data)
        return {**image_set.row(n), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def finish(block: bool) -> None:  # collect written images; a shard whose images are all written gets its manifest
        while pending and (block or pending[0][1].done()):
            n, fut = pending.pop(0)
            rows[n] = fut.result()
            i = n // image_set.shard_size
            left[i] -= 1
            if left[i] == 0:
                manifest = {"shard": i, "batch_per_device": batch_per_device, "process": process,
                            "attention": pipe.attention_impl, "scan_blocks": pipe.scan_blocks,
                            "written_at": time.time(), "images": [rows.pop(m) for m in image_set.shard(i)]}
                storage.write_text(storage.join(out, SHARDS, shard_name(i)), json.dumps(manifest, indent=1,
                                                                                         ensure_ascii=False))

    first_s, steady_s, steady_n, start = 0.0, 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(indices), unit="img", desc=f"{sampler.kind} set", disable=not progress, smoothing=0,
               dynamic_ncols=True)
    try:
        for b, (chunk, images, dt) in enumerate(pipe.generate_batches(
                list(image_set.prompts), sampler, seed=image_set.seed, num_per_prompt=image_set.num_per_prompt,
                batch_size=batch, indices=indices)):
            for r, img in zip(chunk, images):
                pending.append((r["index"], pool.submit(write, r["index"], img)))
            finish(block=False)
            bar.update(len(chunk))
            if b == 0:  # compiling included: the rate and the ETA count from here
                first_s = time.perf_counter() - start
                if not bar.disable:  # tqdm's rate is (n - initial) / (now - start_t)
                    bar.initial, bar.start_t = bar.n, time.time()
                    bar.last_print_n, bar.last_print_t = bar.n, bar.start_t
            else:
                steady_n += len(chunk)
                steady_s = time.perf_counter() - start - first_s
        finish(block=True)
    finally:
        bar.close()
        pool.shutdown(wait=True)
    total_s = time.perf_counter() - start
    per_chip = (steady_n / steady_s if steady_n else len(indices) / total_s if indices else 0.0) / chips
    return {"images": len(indices), "shards": len(shards), "seconds": total_s, "first_batch_s": first_s,
            "images_per_s_per_chip": per_chip, "compile_excluded": bool(steady_n), "chips": chips,
            "batch": batch}


def write_metainfo(out: str, image_set: ImageSet, since: float | None = None) -> tuple[int, int]:
    """Process 0, every shard complete: metainfo.csv (file_name,prompt) in image order, from the manifests.
    Returns (images in the set, images of the shards whose manifest was written at or after unix time `since`)."""
    done = list_manifests(out)
    absent = [i for i in range(image_set.num_shards) if i not in done]
    if absent:
        raise FileNotFoundError(f"{out}: shards {absent[:10]} have no manifest after every process finished")
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", "prompt"])
    n = recent = 0
    for i in range(image_set.num_shards):
        manifest = json.loads(storage.read_text(storage.join(out, SHARDS, shard_name(i))))
        rows = manifest["images"]
        if since is not None and manifest.get("written_at", 0.0) >= since:
            recent += len(rows)
        for r in rows:
            if r["file_name"] != file_name(n):
                raise ValueError(f"{out}/{SHARDS}/{shard_name(i)} lists {r['file_name']} where {file_name(n)} belongs")
            w.writerow([r["file_name"], r["prompt"]])
            n += 1
    storage.write_text(storage.join(out, METAINFO), buf.getvalue())
    return n, recent
