"""Batches for the SwD iteration: latents at the interval's scale s_k and its previous scale, text embeddings.

A source gives, for interval k, `n` stacked host-local batches {"x": [n, B, s_k, s_k, C], "x_prev": [n, B,
s_{k-1}, s_{k-1}, C], "context": [n, B, T, J], "pooled": [n, B, P]} and the unconditional embeddings. Its
`position` (examples consumed, global) is saved in checkpoints, so a resumed run reads exactly the batches
an uninterrupted run would. The VAE sources give posterior means as x / x_prev and, with `data.latent` =
"sample" (the default, as the official code), their stds as "x_std" / "x_prev_std": the train step draws
`x + x_std * eps` with its own PRNG key (`steps.draw_latents`), a fresh sample every time an image is used.
x_prev is the latent of the official cascade image: the image area-resized to 8 s_k px, then that to
8 s_{k-1} px (at k = 0 the image at s_0 itself, drawn independently of x).

- "digits": the built-in toy problem (`swd_jax.demo.digits_source`, registered by the demo package).
- "images": image records (swd_jax.train.records.build_image_dataset) encoded online by our VAE + text encoders.
- "precomputed": array_record shards written by `swd-precompute` (posterior moments `mean_{s}`,
  `std_{s}` for every scale s and `prev_mean_{s}`, `prev_std_{s}` of its cascaded previous-scale image,
  `prompt_embeds`, `pooled_prompt_embeds`; `uncond.npz` beside them), read with the grain loader; checked at
  start-up as `data.verify` says ("fast" or "full", `shard_checks`).
A gs:// `data.path` is refused with the fix (mount the bucket with gcsfuse), or downloaded to each host with
`data.copy_to_local=True` (`shard_checks.local_data_path`): array_record cannot read gs:// itself.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from swd_jax.method.schedule import ScaleSchedule
from swd_jax.train.shard_checks import (  # noqa: F401  (re-exported)
    SHARD_NAME, CorruptShard, IncompleteData, check_precomputed, local_data_path)

LATENTS = ("sample", "mean")


def _check_latent(latent: str) -> None:
    if latent not in LATENTS:
        raise ValueError(f"data.latent={latent!r}; expected 'sample' (a fresh VAE posterior draw every time an "
                         "image is used, as the official code) or 'mean' (the posterior mean)")


def latent_batch(record: dict, s: int, s_prev: int, latent: str, where: str) -> dict[str, np.ndarray]:
    """x / x_prev (posterior means at s and of its cascaded previous-scale image) and, for 'sample', their stds."""
    prev = "prev_" if s_prev != s else ""
    names = {"x": f"mean_{s}", "x_prev": f"{prev}mean_{s}"}
    if latent == "sample":
        names.update(x_std=f"std_{s}", x_prev_std=f"{prev}std_{s}")
    missing = [v for v in names.values() if v not in record]
    if missing and any(k.startswith("latents_") for k in record):
        raise ValueError(f"{where} holds the old precompute format (latents_{{s}}: one fixed VAE sample per scale, "
                         "previous scale not cascaded): redo it into a new folder with `swd-precompute`")
    if missing:
        raise KeyError(f"{where} lacks {missing} (scale {s}, previous scale {s_prev}); it holds {sorted(record)}")
    out = {k: record[v] for k, v in names.items()}
    if out["x_prev"].shape[-3] != s_prev:
        raise ValueError(f"{where}: the previous-scale latent of scale {s} is {out['x_prev'].shape[-3]} px, the "
                         f"schedule's previous scale is {s_prev}: precompute with the schedule's --scales")
    return out


class _RecordSource:
    """What both record sources share: the loader's position in examples, and n batches of interval k stacked
    (each record batch turned into model inputs by `_inputs`)."""
    loader: object
    global_batch: int
    schedule: ScaleSchedule

    @property
    def position(self) -> int:
        return self.loader.position * self.global_batch

    def batches(self, k: int, n: int) -> dict[str, np.ndarray]:
        s, s_prev = self.schedule.scale(k), self.schedule.prev_scale(k)
        out = [self._inputs(next(self.loader), s, s_prev) for _ in range(n)]
        return {key: np.stack([o[key] for o in out]) for key in out[0]}

    def _inputs(self, b: dict, s: int, s_prev: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class PrecomputedSource(_RecordSource):
    """array_record shards of precomputed posterior moments (per scale) and text embeddings, via grain."""

    def __init__(self, path: str, schedule: ScaleSchedule, global_batch: int, seed: int, position: int = 0,
                 latent: str = "sample", verify: str = "fast"):
        from swd_jax.train.precompute import check_format
        from swd_jax.train.records import array_record_files, make_loader
        _check_latent(latent)
        check_format(path)
        self.latent = latent
        files = array_record_files(path)
        if not files:
            raise FileNotFoundError(f"no .array_record shards in {path}; run `swd-precompute` first")
        _checked_once(path, files, verify)
        uncond = os.path.join(path, "uncond.npz")
        if not os.path.exists(uncond):
            raise FileNotFoundError(f"{uncond} missing: precompute writes the empty-prompt embeddings there")
        with np.load(uncond) as z:
            self._uncond = {"context": z["prompt_embeds"], "pooled": z["pooled_prompt_embeds"]}
        self.schedule, self.global_batch = schedule, global_batch
        per_host = global_batch // jax.process_count()
        self.files = files
        self.loader = make_loader(files, per_host, seed, start_position=position // global_batch)

    def _inputs(self, b: dict, s: int, s_prev: int) -> dict[str, np.ndarray]:
        return {**latent_batch(b, s, s_prev, self.latent, "precomputed records"), "context": b["prompt_embeds"],
                "pooled": b["pooled_prompt_embeds"]}

    def uncond(self) -> dict[str, np.ndarray]:
        return self._uncond

    def validation_cond(self, n: int) -> dict[str, np.ndarray]:
        """The text embeddings of the first n records (fixed across runs and resumes)."""
        from swd_jax.train.records import decode_array_record, open_source
        records = open_source(self.files).records
        rows = [decode_array_record(records[i]) for i in range(min(n, len(records)))]
        return {"context": np.stack([np.asarray(r["prompt_embeds"], np.float32) for r in rows]),
                "pooled": np.stack([np.asarray(r["pooled_prompt_embeds"], np.float32) for r in rows])}


class OnlineSource(_RecordSource):
    """Image records (`swd_jax.train.records.build_image_dataset`) encoded on the fly by our VAE and text encoders.

    For interval k only what it needs is encoded: the image at 8*max(scales) area-downscaled to 8*s_k, and that
    to 8*s_{k-1} (the official cascade), each to its VAE posterior moments (the train step draws the samples).
    """

    def __init__(self, path: str, model_dir: str, schedule: ScaleSchedule, global_batch: int, seed: int,
                 position: int = 0, max_sequence_length: int = 256, dtype: str = "float32", devices=None,
                 latent: str = "sample"):
        import dataclasses as dc

        import jax.numpy as jnp

        from swd_jax.train.records import make_loader
        from swd_jax.train.precompute import Precomputer
        _check_latent(latent)
        self.latent = latent
        if not model_dir:
            raise ValueError("data.kind='images' encodes online: model.path must be the diffusers SD3 folder "
                             "(vae/, text_encoder*/, tokenizer*/)")
        from swd_jax.train.records import open_source
        self.records = open_source(path)  # the folder build_image_dataset(image_dir, out_dir) returned
        if self.records.kind != "images":
            raise ValueError(f"{path} holds array records, not images: use data.kind='precomputed' for those")
        self.enc = Precomputer(model_dir, schedule.scales, max_sequence_length=max_sequence_length,
                               dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), store_dtype=jnp.float32,
                               devices=devices)
        self._spec = lambda s, s_prev: dc.replace(self.enc.spec, scales=(s,), prev_scales=(s_prev,))
        self.schedule, self.global_batch = schedule, global_batch
        self.loader = make_loader(self.records, global_batch // jax.process_count(), seed,
                                  start_position=position // global_batch, resolution=self.enc.resolution,
                                  image_dtype="float32")

    def _inputs(self, b: dict, s: int, s_prev: int) -> dict[str, np.ndarray]:
        e = jax.device_get(self.enc(b["image"], list(b["prompt"]), self._spec(s, s_prev)))
        return {**latent_batch(e, s, s_prev, self.latent, "online encoding"), "context": e["prompt_embeds"],
                "pooled": e["pooled_prompt_embeds"]}

    def uncond(self) -> dict[str, np.ndarray]:
        u = self.enc.uncond()
        return {"context": u["prompt_embeds"], "pooled": u["pooled_prompt_embeds"]}

    def validation_cond(self, n: int) -> dict[str, np.ndarray]:
        records = self.records.records
        raw = [records[i]["prompt"] for i in range(min(n, len(records)))]
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in raw]
        embeds, pooled = self.enc.text.encode_prompt(prompts)
        return {"context": np.asarray(embeds, np.float32), "pooled": np.asarray(pooled, np.float32)}


# data.kind -> factory(c, schedule, transformer_config, position, devices); packages add their own kinds (the
# digits demo registers "digits" from swd_jax.demo.digits_source), so the trainer imports nothing above it.
SOURCES = {}


def register_source(kind: str, factory) -> None:
    """Make `data.kind=kind` build its source with `factory(c, schedule, transformer_config, position, devices)`."""
    SOURCES[kind] = factory


def check_data(c) -> None:
    """The start-up check of the configured data, cheap enough to run before any model is built (the loop's
    first step): a gs:// path refused or copied, precomputed shards checked as `data.verify` says. The source
    made later repeats none of it (a folder checked in this process is remembered)."""
    if c.data.kind not in ("precomputed", "images") or not c.data.path:
        return
    path = local_data_path(c.data.path, c.data.get("copy_to_local", False))
    if c.data.kind == "precomputed":
        from swd_jax.train.precompute import check_format
        from swd_jax.train.records import array_record_files
        check_format(path)
        files = array_record_files(path)
        if files:
            _checked_once(path, files, c.data.get("verify", "fast"))


_CHECKED: set = set()


def _checked_once(path: str, files: list[str], verify: str) -> None:
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    key = (path, verify, tuple(names), tuple((f, os.path.getsize(f), os.path.getmtime(f)) for f in files))
    if key not in _CHECKED:
        check_precomputed(path, files, verify)
        _CHECKED.add(key)


def _precomputed(c, schedule, transformer_config, position=0, devices=None):
    if not c.data.path:
        raise ValueError("data.kind='precomputed' needs data.path (the output folder of swd-precompute)")
    path = local_data_path(c.data.path, c.data.get("copy_to_local", False))
    return PrecomputedSource(path, schedule, c.train.batch_size, c.data.seed, position, c.data.latent,
                             c.data.get("verify", "fast"))


def _images(c, schedule, transformer_config, position=0, devices=None):
    path = local_data_path(c.data.path, c.data.get("copy_to_local", False))
    return OnlineSource(path, c.model.path, schedule, c.train.batch_size, c.data.seed, position,
                        c.data.max_sequence_length, c.model.dtype, devices, c.data.latent)


register_source("precomputed", _precomputed)
register_source("images", _images)


def make_source(c, schedule: ScaleSchedule, transformer_config, position: int = 0, devices=None):
    """The configured data source; `devices`: this host's devices of the run's mesh (online encoding)."""
    if c.data.kind not in SOURCES:
        raise ValueError(f"data.kind={c.data.kind!r}; expected one of {sorted(SOURCES)} (other kinds register "
                         "themselves on import: 'digits' needs `import swd_jax.demo.digits_source` in the config)")
    return SOURCES[c.data.kind](c, schedule, transformer_config, position, devices)
