"""Precompute SwD training inputs: SD3 text embeddings and VAE latents at every scale, as array_record shards.

    python -m swd_jax.precompute --model /ckpt/stable-diffusion-3.5-medium --data /data/sd35_medium_train_data \
        --out /data/sd35m_pre --scales 64,80,96,128

Input: an SwD dataset folder (images + `metainfo.csv`, columns found by name as `data.read_metainfo` does).
Output, in `--out` (the `PrecomputedSource` of `train_data` reads it):
- `precomputed-{i:05d}-of-{n:05d}.array_record`: one record per image (`data.encode_array_record`) with
  `latents_{s}` [s, s, C] for every scale s (normalised: `(z - shift) * scale`), `prompt_embeds`
  [77 + T, D_t5], `pooled_prompt_embeds` [P] (all `--store_dtype`), `prompt` and `file_name` (str);
- `uncond.npz`: `prompt_embeds` [1, 77 + T, D_t5] and `pooled_prompt_embeds` [1, P] (float32), the empty prompt;
- `precompute.json`: the settings; a rerun with other settings into the same folder raises.

Latent at scale s: the image area-downscaled (torch `interpolate(mode="area")`, `resize.area_resize`) to
s * 8 px, VAE-encoded, and either the posterior mean or one posterior sample (`--latent sample`, the default:
the reference draws `latent_dist.sample()`, afresh at every step; here one draw per image and scale, seeded
by (seed, row, scale)). The reference derives the previous scale's image from the current scale's
(area of area); we area-downscale the original for every scale (equal when the ratios are integers).

Sharding: rows are cut into shards of `--shard_size`; host h of P writes shards i with i % P == h (disjoint,
together all of them). With `--distributed` each process of a slice (or of `launch/local_multiprocess.sh`)
runs this command; the layout comes as for the trainer (`swd_jax.train.distributed`). On a host,
a batch of `--per_device_batch` x local devices is split over its local devices (data parallel, parameters
replicated). Resumable: a shard is written under a `.partial` name and renamed when complete (beside it
`<shard>.json` records its row count, checked by the trainer at start-up); finished shards are skipped on a
rerun. Undecodable or missing images raise naming the file (`--skip_bad` skips
and counts them instead). Images not of the largest scale's pixel size are center-cropped and resized by
`data.decode_image` first (the SwD datasets are 1024 px squares: untouched).

Memory: every encoder is replicated on each local device; T5-XXL alone is ~9.5 GB at
`--param_dtype bfloat16` (~19 GB at float32).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swd_jax.convert.vae import load_vae
from swd_jax.train.records import ArrayRecordsWriter, decode_image, read_metainfo
from swd_jax.models.vae import AutoencoderKL, normalize_latents, sample_latent
from swd_jax.prompt_encoding import SD3PromptEncoder, TextModels, encode_tokens
from swd_jax.resize import area_resize

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SETTINGS = ("scales", "max_sequence_length", "latent", "seed", "store_dtype", "dtype", "n_rows", "shard_size")


def shard_name(i: int, n: int) -> str:
    return f"precomputed-{i:05d}-of-{n:05d}.array_record"


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive shards of `shard_size` rows (the last may be shorter)."""
    return [(a, min(a + shard_size, n_rows)) for a in range(0, n_rows, shard_size)]


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """How latents are made: scales, posterior mean or sample (seeded by (seed, row, scale)), stored dtype."""

    scales: tuple[int, ...]
    latent: str
    seed: int
    store_dtype: Any


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def encode_batch(text_models: TextModels, vae: AutoencoderKL, spec: LatentSpec, params: dict, img_BHWC: jax.Array,
                 ids: dict, rows_B: jax.Array) -> dict[str, jax.Array]:
    """Images in [-1, 1] at the largest scale, token ids, row ids -> {latents_s, prompt_embeds, pooled_...}."""
    out = {}
    out["prompt_embeds"], out["pooled_prompt_embeds"] = encode_tokens(text_models, params["text"], ids)
    keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(spec.seed), r))(rows_B)
    for j, s in enumerate(spec.scales):
        x = area_resize(img_BHWC, vae.config.downsample_factor * s)
        mean, logvar = vae.apply({"params": params["vae"]}, x, method=AutoencoderKL.encode)
        if spec.latent == "sample":
            z = jax.vmap(lambda m, lv, k: sample_latent(m[None], lv[None], jax.random.fold_in(k, j))[0])(
                mean, logvar, keys_B)
        else:
            z = mean
        out[f"latents_{s}"] = normalize_latents(z, vae.config)
    return {k: v.astype(spec.store_dtype) for k, v in out.items()}


class Precomputer:
    """Encoders and tokenizers with parameters replicated over `devices`; batches split over them."""

    def __init__(self, model_dir: str, scales: Sequence[int], *, max_sequence_length: int = 256,
                 latent: str = "sample", seed: int = 0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 store_dtype=jnp.bfloat16, devices: Sequence[jax.Device] | None = None):
        if latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' or 'mean', got {latent!r}")
        self.spec = LatentSpec(tuple(int(s) for s in scales), latent, int(seed), store_dtype)
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, P())
        self.text = SD3PromptEncoder(model_dir, max_sequence_length=max_sequence_length, dtype=dtype,
                                     param_dtype=param_dtype, sharding=replicated)
        self.vae, vae_params = load_vae(os.path.join(model_dir, "vae"), dtype=dtype, param_dtype=param_dtype)
        self.resolution = self.vae.config.downsample_factor * max(self.spec.scales)
        self.params = {"text": self.text.params, "vae": jax.device_put(vae_params, replicated)}
        self.data_sharding = NamedSharding(self.mesh, P("data"))

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def __call__(self, images_BHWC: np.ndarray, prompts: Sequence[str], rows: np.ndarray) -> dict[str, jax.Array]:
        """Dispatch one batch (its size a multiple of the device count); returns device arrays (async)."""
        inputs = jax.device_put((images_BHWC, self.text.tokenize(prompts), np.asarray(rows, np.int32)),
                                self.data_sharding)
        return encode_batch(self.text.models, self.vae, self.spec, self.params, *inputs)

    def uncond(self) -> dict[str, np.ndarray]:
        embeds, pooled = self.text.encode_prompt([""])
        return {"prompt_embeds": np.asarray(embeds, np.float32), "pooled_prompt_embeds": np.asarray(pooled, np.float32)}


def _load_image(data_dir: str, name: str, resolution: int) -> np.ndarray:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} named in metainfo does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return decode_image(raw, resolution, "float32")
    except Exception as e:  # PIL raises several types for a bad file
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, "precompute.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), settings[k]) for k in settings if old.get(k) != settings[k]}
        if diff:
            raise ValueError(f"{out_dir} holds a precompute with other settings {diff} (old, new); use a new --out")
    elif jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)


def precompute(model_dir: str, data_dir: str, out_dir: str, scales: Sequence[int], *, metainfo: str = "metainfo.csv",
               max_sequence_length: int = 256, shard_size: int = 512, per_device_batch: int = 1,
               latent: str = "sample", seed: int = 0, dtype: str = "bfloat16", param_dtype: str = "bfloat16",
               store_dtype: str = "bfloat16", skip_bad: bool = False, devices=None, progress: bool = True) -> dict:
    """Write this host's shards of `data_dir` into `out_dir`; returns counts {written, skipped_shards, bad}."""
    for name, d in (("dtype", dtype), ("param_dtype", param_dtype), ("store_dtype", store_dtype)):
        if d not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {d!r}")
    rows = read_metainfo(metainfo if os.path.isabs(metainfo) else os.path.join(data_dir, metainfo))
    os.makedirs(out_dir, exist_ok=True)
    settings = dict(scales=list(scales), max_sequence_length=max_sequence_length, latent=latent, seed=seed,
                    store_dtype=store_dtype, dtype=dtype, n_rows=len(rows), shard_size=shard_size)
    _check_settings(out_dir, settings)
    enc = Precomputer(model_dir, scales, max_sequence_length=max_sequence_length, latent=latent, seed=seed,
                      dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype], store_dtype=DTYPES[store_dtype],
                      devices=devices)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(out_dir, "uncond.npz")):
        tmp = os.path.join(out_dir, "uncond.partial.npz")
        np.savez(tmp, **enc.uncond())
        os.replace(tmp, os.path.join(out_dir, "uncond.npz"))
    ranges = shard_ranges(len(rows), shard_size)
    mine = [i for i in range(len(ranges)) if i % jax.process_count() == jax.process_index()]
    todo = [i for i in mine if not os.path.exists(os.path.join(out_dir, shard_name(i, len(ranges))))]
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in mine), disable=not progress, desc="precompute",
               initial=sum(ranges[i][1] - ranges[i][0] for i in mine if i not in todo))
    batch = per_device_batch * enc.n_devices
    counts = {"written": 0, "skipped_shards": len(mine) - len(todo), "bad": 0}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def load(r):
        try:
            return _load_image(data_dir, rows[r][0], enc.resolution)
        except (OSError, ValueError):
            if not skip_bad:
                raise
            log.warning("skipping row %d (%s): unreadable image", r, rows[r][0])
            return None

    try:
        for i in todo:
            a, b = ranges[i]
            final = os.path.join(out_dir, shard_name(i, len(ranges)))
            partial = final.replace(".array_record", ".partial")
            bad_before = counts["bad"]
            with ArrayRecordsWriter(partial) as w:
                for start in range(a, b, batch):
                    idx = list(range(start, min(start + batch, b)))
                    imgs = list(pool.map(load, idx))
                    keep = [(r, im) for r, im in zip(idx, imgs) if im is not None]
                    counts["bad"] += len(idx) - len(keep)
                    if keep:
                        pad = batch - len(keep)
                        rs = [r for r, _ in keep] + [keep[-1][0]] * pad
                        x = np.stack([im for _, im in keep] + [keep[-1][1]] * pad)
                        out = jax.device_get(enc(x, [rows[r][1] for r in rs], np.asarray(rs)))
                        for n, r in enumerate(rs[:len(keep)]):
                            w.write({**{k: v[n] for k, v in out.items()}, "prompt": rows[r][1],
                                     "file_name": rows[r][0]})
                            counts["written"] += 1
                    bar.update(len(idx))
            with open(final + ".json", "w") as f:  # what the trainer's start-up check expects of the shard
                json.dump({"rows": w.count, "skipped_bad": counts["bad"] - bad_before}, f)
            os.replace(partial, final)
    finally:
        pool.shutdown()
        bar.close()
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers SD3 folder (vae/, text_encoder*/, tokenizer*/)")
    p.add_argument("--data", required=True, help="SwD dataset folder: images + metainfo.csv")
    p.add_argument("--out", required=True)
    p.add_argument("--scales", required=True, help="latent sizes, e.g. 64,80,96,128")
    p.add_argument("--metainfo", default="metainfo.csv")
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens")
    p.add_argument("--shard_size", type=int, default=512)
    p.add_argument("--per_device_batch", type=int, default=1)
    p.add_argument("--latent", choices=("sample", "mean"), default="sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param_dtype", default="bfloat16", help="float32 if memory allows (T5 weights are fp16)")
    p.add_argument("--store_dtype", default="bfloat16")
    p.add_argument("--skip_bad", action="store_true", help="skip unreadable images instead of raising")
    p.add_argument("--distributed", action="store_true",
                   help="several processes: layout from --coordinator/--num_processes/--process_id, else the "
                        "SWD_COORDINATOR/SWD_NUM_PROCESSES/SWD_PROCESS_ID variables, else auto (TPU VMs)")
    p.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.distributed:
        from swd_jax.train import distributed
        if not (a.coordinator or os.environ.get("SWD_COORDINATOR")):
            os.environ.setdefault("SWD_DISTRIBUTED", "1")  # no explicit layout: let jax find the slice's
        distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    counts = precompute(a.model, a.data, a.out, [int(s) for s in a.scales.split(",")], metainfo=a.metainfo,
                        max_sequence_length=a.max_sequence_length, shard_size=a.shard_size,
                        per_device_batch=a.per_device_batch, latent=a.latent, seed=a.seed, dtype=a.dtype,
                        param_dtype=a.param_dtype, store_dtype=a.store_dtype, skip_bad=a.skip_bad)
    print(json.dumps({"host": jax.process_index(), **counts}), file=sys.stderr)


if __name__ == "__main__":
    main()
