"""Precompute SwD training inputs: SD3 text embeddings and VAE posterior moments at every scale, as array_record shards.

    swd-precompute --model /ckpt/stable-diffusion-3.5-medium --data /data/sd35_medium_train_data \
        --out /data/sd35m_pre --scales 64,80,96,128
    swd-precompute ... --data gs://my-data/sd35m_train --out gs://my-data/sd35m_pre   # Cloud Storage both ways

Input: an SwD dataset folder (images + `metainfo.csv`, columns found by name as `data.read_metainfo` does).
Output, in `--out` (the `PrecomputedSource` of `train_data` reads it), format `FORMAT`:
- `precomputed-{i:05d}-of-{n:05d}.array_record`: one record per image (`data.encode_array_record`) holding, for
  every scale s, the VAE posterior of the image at s: `mean_{s}` and `std_{s}` [s, s, C], normalised (mean
  `(m - shift) * scale`, std `exp(logvar / 2) * scale`, so a normalised latent is `mean + std * eps`), and for
  every scale but the first the posterior of its previous-scale image: `prev_mean_{s}`, `prev_std_{s}`
  [s', s', C] (s' the scale before s); `prompt_embeds` [77 + T, D_t5], `pooled_prompt_embeds` [P] (all
  `--store_dtype`), `prompt` and `file_name` (str);
- `uncond.npz`: `prompt_embeds` [1, 77 + T, D_t5] and `pooled_prompt_embeds` [1, P] (float32), the empty prompt;
- a FLUX pipeline folder (model_index.json `FluxPipeline`) gets FLUX's encoders and VAE instead
  (`flux_prompt_encoding`): `prompt_embeds` [T, D_t5] (T5 only; pass `--max_sequence_length 512`), pooled CLIP-L;
- `precompute.json`: the settings and the format; a rerun with other settings into the same folder raises,
  and the trainer refuses a folder of another format, saying how to redo it.

Images, as the official `sample_batch` (yandex-research/swd `src/utils/train_utils.py`) makes them: the image
area-downscaled (torch `interpolate(mode="area")`, `resize.area_resize`) to s * 8 px, and the previous-scale
image area-downscaled from THAT to s' * 8 px (a cascade; not from the original: where s / s' is not an
integer the two differ by 10-20%). At the first scale the previous-scale image is the image itself (the
official code's `previous_scales = scales`): readers use `mean_{s}` / `std_{s}` for both, and draw twice.
The official code draws `latent_dist.sample()` afresh every time an image is used; the trainer does the
same from the stored moments, with the step's PRNG key (`swd_jax.train.steps.draw_latents`), or takes the
mean with `--config.data.latent=mean`.

Sharding: rows are cut into shards of `--shard_size`; host h of P writes shards i with i % P == h (disjoint,
together all of them). With `--distributed` each process of a slice (or of `launch/local_multiprocess.sh`)
runs this command; the layout comes as for the trainer (`swd_jax.train.distributed`). On a host,
a batch of `--per_device_batch` x local devices is split over its local devices (data parallel, parameters
replicated). Resumable: a shard is written under a `.partial` name and renamed when complete (beside it,
written first, `<shard>.json` records its row count, size and CRC32C, checked by the trainer at start-up:
`shard_checks`); finished shards are skipped on a rerun. On a gs:// `--out` a shard is written to a local
scratch file and uploaded when complete (one object upload: it appears only once whole), so a rerun resumes
the same way; `--data` may be gs:// too (downloaded to the local cache, `storage.local_copy`). `--model` may be
gs:// or a Hugging Face Hub id (ORG/NAME[@REV]: its encoders and VAE fetched into the Hub's cache). `--scales`
are checked against the model's transformer/config.json as swd-train checks them, before any work.
`precompute.json` also records the command, which the trainer quotes to say how to redo a bad shard.
metainfo.csv is read strictly (`metainfo`: a bad line is refused with its number; rows read are reported
against lines in the file; `--strict_prompts` also refuses empty prompts). Missing images are refused before
any model loads and undecodable ones raise naming the file (`--skip_bad` skips and counts both instead).
Images not of the largest scale's pixel size are center-cropped and resized by
`data.decode_image` first (the SwD datasets are 1024 px squares: untouched).

Memory: every encoder is replicated on each local device; T5-XXL alone is ~9.5 GB at
`--param_dtype bfloat16` (~19 GB at float32). Storage per image (SD3.5-M scales 64,80,96,128, bf16): 3.6 MB
of posterior moments + 2.7 MB of T5 embeddings at 256 tokens.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swd_jax import storage
from swd_jax.convert.flux_prompt_encoding import FluxTextModels, encode_any_tokens, load_prompt_encoder
from swd_jax.convert.folders import NOT_TRANSFORMER, hub_id, local_model_folder
from swd_jax.convert.prompt_encoding import TextModels
from swd_jax.convert.vae import load_vae
from swd_jax.method.resize import area_resize
from swd_jax.models.vae import AutoencoderKL, normalize_latents
from swd_jax.train.metainfo import describe, read_metainfo
from swd_jax.train.records import ArrayRecordsWriter, decode_image
from swd_jax.train.shard_checks import shard_name, shard_sidecar

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FORMAT = 2  # 1: one posterior sample per scale, previous scale not cascaded; 2: moments, cascade


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive shards of `shard_size` rows (the last may be shorter)."""
    return [(a, min(a + shard_size, n_rows)) for a in range(0, n_rows, shard_size)]


def previous_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """The scale before each of `scales` (strictly increasing); the first scale's is itself."""
    scales = tuple(int(s) for s in scales)
    if not scales or any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly increasing latent sizes, got {list(scales)}")
    return scales[:1] + scales[:-1]


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """Which posteriors are made: the image at each of `scales`, and its cascade to the paired `prev_scales`."""

    scales: tuple[int, ...]
    prev_scales: tuple[int, ...]
    store_dtype: Any


def cascade_images(img_BHWC: jax.Array, size: int, prev_size: int) -> tuple[jax.Array, jax.Array]:
    """The official `sample_batch` images: area-resize to `size` px, then THAT to `prev_size` px."""
    img = area_resize(img_BHWC, size)
    return img, area_resize(img, prev_size)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def encode_batch(text_models: TextModels | FluxTextModels, vae: AutoencoderKL, spec: LatentSpec, params: dict,
                 img_BHWC: jax.Array, ids: dict) -> dict[str, jax.Array]:
    """Images in [-1, 1] at the largest scale, token ids -> {mean_s, std_s, prev_mean_s, prev_std_s, embeddings}."""
    out = {}
    out["prompt_embeds"], out["pooled_prompt_embeds"] = encode_any_tokens(text_models, params["text"], ids)
    f = vae.config.downsample_factor

    def moments(x):
        mean, logvar = vae.apply({"params": params["vae"]}, x, method=AutoencoderKL.encode)
        return normalize_latents(mean, vae.config), jnp.exp(0.5 * logvar) * vae.config.scaling_factor

    for s, s_prev in zip(spec.scales, spec.prev_scales):
        img, img_prev = cascade_images(img_BHWC, f * s, f * s_prev)
        out[f"mean_{s}"], out[f"std_{s}"] = moments(img)
        if s_prev != s:
            out[f"prev_mean_{s}"], out[f"prev_std_{s}"] = moments(img_prev)
    return {k: v.astype(spec.store_dtype) for k, v in out.items()}


def check_format(path: str) -> None:
    """Raise, saying how to redo it, if the precompute folder `path` (local or gs://) was written in another format."""
    settings = storage.join(path, "precompute.json")
    if not storage.exists(settings):
        return
    old = json.loads(storage.read_text(settings))
    if old.get("format", 1) != FORMAT:
        scales = ",".join(str(s) for s in old.get("scales", [])) or "S1,S2,..."
        raise ValueError(
            f"{path} was precomputed in format {old.get('format', 1)} (one fixed VAE sample per scale, previous "
            f"scale not cascaded); the trainer needs format {FORMAT}: redo it into a new folder with "
            f"`swd-precompute --model MODEL --data DATA --out NEW_DIR --scales {scales}`")


def check_scales_fit_model(model_dir: str, scales: Sequence[int]) -> None:
    """Refuse, before any work, scales the trainer would refuse for the model's transformer (its
    transformer/config.json; of a Hub id only that file is fetched). A folder without one, a gs:// folder or a
    missing folder is not checked here (the encoders' loading names a missing folder)."""
    previous_scales(scales)
    if storage.is_remote(model_dir) or not (os.path.isdir(model_dir) or hub_id(model_dir)):
        return
    local = local_model_folder(model_dir, ("transformer/config.json",), "--model")
    folder = os.path.join(local, "transformer")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return
    from swd_jax.convert.converted import diffusers_config
    from swd_jax.train.setup import check_scales_fit
    cfg = diffusers_config(folder)  # a class we do not train raises, naming it
    try:
        check_scales_fit(tuple(scales), cfg)
    except ValueError as e:
        raise ValueError(f"--scales {','.join(map(str, scales))}: swd-train would refuse them: {e}") from None


class Precomputer:
    """Encoders and tokenizers with parameters replicated over `devices`; batches split over them."""

    def __init__(self, model_dir: str, scales: Sequence[int], *, max_sequence_length: int = 256,
                 dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, store_dtype=jnp.bfloat16,
                 devices: Sequence[jax.Device] | None = None):
        self.spec = LatentSpec(tuple(int(s) for s in scales), previous_scales(scales), store_dtype)
        model_dir = local_model_folder(model_dir, NOT_TRANSFORMER, "model folder")  # gs:// or a Hub id: local copy
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, P())
        self.text = load_prompt_encoder(model_dir, max_sequence_length=max_sequence_length, dtype=dtype,
                                        param_dtype=param_dtype, sharding=replicated)  # SD3's or FLUX's
        self.vae, vae_params = load_vae(os.path.join(model_dir, "vae"), dtype=dtype, param_dtype=param_dtype)
        self.resolution = self.vae.config.downsample_factor * max(self.spec.scales)
        self.params = {"text": self.text.params, "vae": jax.device_put(vae_params, replicated)}
        self.data_sharding = NamedSharding(self.mesh, P("data"))

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def __call__(self, images_BHWC: np.ndarray, prompts: Sequence[str], spec: LatentSpec | None = None
                 ) -> dict[str, jax.Array]:
        """Dispatch one batch (its size a multiple of the device count); returns device arrays (async)."""
        inputs = jax.device_put((images_BHWC, self.text.tokenize(prompts)), self.data_sharding)
        return encode_batch(self.text.models, self.vae, spec or self.spec, self.params, *inputs)

    def uncond(self) -> dict[str, np.ndarray]:
        embeds, pooled = self.text.encode_prompt([""])
        return {"prompt_embeds": np.asarray(embeds, np.float32), "pooled_prompt_embeds": np.asarray(pooled, np.float32)}


def _load_image(data_dir: str, name: str, resolution: int) -> np.ndarray:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} named in metainfo does not exist (--skip_bad leaves it out)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return decode_image(raw, resolution, "float32")
    except Exception as e:  # PIL raises several types for a bad file
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def _check_settings(out_dir: str, settings: dict, record: dict) -> None:
    """Refuse a rerun into `out_dir` with other `settings`; the first run writes them (+ `record`, not compared)."""
    path = storage.join(out_dir, "precompute.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        check_format(out_dir)
        diff = {k: (old.get(k), settings[k]) for k in settings if old.get(k) != settings[k]}
        if diff:
            raise ValueError(f"{out_dir} holds a precompute with other settings {diff} (old, new); use a new --out")
    elif jax.process_index() == 0:
        storage.write_text(path, json.dumps({**settings, **record}, indent=2))


def _check_images(data_dir: str, rows, csv_path: str) -> None:
    """Refuse, before any model is loaded, rows whose image file does not exist (named with their csv line)."""
    missing = [(line, name) for line, (name, _) in zip(rows.line_of, rows) if not os.path.isfile(
        os.path.join(data_dir, name))]
    if missing:
        shown = ", ".join(f"line {line}: {name}" for line, name in missing[:3])
        raise FileNotFoundError(f"{csv_path}: {len(missing)} of {len(rows)} images not found in {data_dir} ({shown}"
                                f"{', ...' if len(missing) > 3 else ''}); --skip_bad leaves them out")


def _finish_shard(local: str, final: str, rows: int, skipped_bad: int) -> None:
    """Publish a complete local shard file as `final` (local or gs://): its sidecar (row count, size, CRC32C)
    first, then the shard itself (a rename, or one upload: the object appears only once complete)."""
    storage.write_text(final + ".json", json.dumps(shard_sidecar(local, rows, skipped_bad)))
    if storage.is_remote(final):
        storage.copy_file(local, final)
        os.remove(local)
    else:
        os.replace(local, final)


def precompute(model_dir: str, data_dir: str, out_dir: str, scales: Sequence[int], *, metainfo: str = "metainfo.csv",
               max_sequence_length: int = 256, shard_size: int = 512, per_device_batch: int = 1,
               dtype: str = "bfloat16", param_dtype: str = "bfloat16",
               store_dtype: str = "bfloat16", skip_bad: bool = False, devices=None, progress: bool = True,
               allow_empty_prompts: bool = True, command: str | None = None) -> dict:
    """Write this host's shards of `data_dir` into `out_dir`; returns counts {written, skipped_shards, bad}.

    `data_dir` and `out_dir` may be gs:// (the images are downloaded to the local cache first; shards are
    written locally and uploaded one by one as each completes). `command`: recorded in precompute.json, so the
    trainer can say how to redo a shard.
    """
    for name, d in (("dtype", dtype), ("param_dtype", param_dtype), ("store_dtype", store_dtype)):
        if d not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {d!r}")
    check_scales_fit_model(model_dir, scales)
    csv_path = metainfo if (os.path.isabs(metainfo) or storage.is_remote(metainfo)) else storage.join(data_dir,
                                                                                                       metainfo)
    rows = read_metainfo(csv_path, allow_empty_prompts=allow_empty_prompts)
    if jax.process_index() == 0:
        print(describe(rows, csv_path), file=sys.stderr)
    data_dir = storage.local_copy(data_dir, what="--data")  # itself when local
    if not skip_bad:
        _check_images(data_dir, rows, csv_path)
    out_dir = storage.resolve(out_dir)
    storage.makedirs(out_dir)
    previous_scales(scales)
    settings = dict(format=FORMAT, scales=list(scales), max_sequence_length=max_sequence_length,
                    store_dtype=store_dtype, dtype=dtype, n_rows=len(rows), shard_size=shard_size)
    _check_settings(out_dir, settings, {"checksums": True, "out": out_dir, **({"command": command} if command else {})})
    enc = Precomputer(model_dir, scales, max_sequence_length=max_sequence_length, dtype=DTYPES[dtype],
                      param_dtype=DTYPES[param_dtype], store_dtype=DTYPES[store_dtype], devices=devices)
    if jax.process_index() == 0 and not storage.exists(storage.join(out_dir, "uncond.npz")):
        buf = io.BytesIO()
        np.savez(buf, **enc.uncond())
        storage.write_bytes(storage.join(out_dir, "uncond.npz"), buf.getvalue())  # atomic
    ranges = shard_ranges(len(rows), shard_size)
    mine = [i for i in range(len(ranges)) if i % jax.process_count() == jax.process_index()]
    done = set(storage.listdir(out_dir))
    todo = [i for i in mine if shard_name(i, len(ranges)) not in done]
    scratch = tempfile.mkdtemp(prefix="swd_precompute_") if storage.is_remote(out_dir) else None
    from swd_jax.train.progress import Progress
    bar = Progress(sum(ranges[i][1] - ranges[i][0] for i in mine), desc="precompute", disable=not progress,
                   initial=sum(ranges[i][1] - ranges[i][0] for i in mine if i not in todo))
    first = True  # the first batch compiles the encoders: its time stays out of the ETA
    batch = per_device_batch * enc.n_devices
    counts = {"written": 0, "skipped_shards": len(mine) - len(todo), "bad": 0}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def load(r):
        try:
            return _load_image(data_dir, rows[r][0], enc.resolution)
        except (OSError, ValueError):
            if not skip_bad:
                raise
            print(f"{csv_path} line {rows.line_of[r] if rows.line_of else '?'}: image {rows[r][0]} missing or "
                  "unreadable; skipped (--skip_bad)", file=sys.stderr)
            return None

    try:
        for i in todo:
            a, b = ranges[i]
            final = storage.join(out_dir, shard_name(i, len(ranges)))
            partial = os.path.join(scratch or out_dir, shard_name(i, len(ranges)).replace(".array_record", ".partial"))
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
                        out = jax.device_get(enc(x, [rows[r][1] for r in rs]))
                        for n, r in enumerate(rs[:len(keep)]):
                            w.write({**{k: v[n] for k, v in out.items()}, "prompt": rows[r][1],
                                     "file_name": rows[r][0]})
                            counts["written"] += 1
                    bar.update(len(idx), compiled=first)
                    first = False
            _finish_shard(partial, final, w.count, counts["bad"] - bad_before)
    finally:
        pool.shutdown()
        bar.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return counts
