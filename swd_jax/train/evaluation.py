"""The paper's metrics during training (`config.eval`): every `eval.every` steps, sample each prompt set with the
current student and score it as `swd-evaluate` does (FID, CLIP score, PickScore), logged as `eval/<set>/<metric>`.

    --config.eval.every=500 --config.eval.sets=coco:/data/coco.csv:/data/coco_fid_stats.npz,mjhq:/data/mjhq.csv \
    --config.eval.num_samples=5008 --config.eval.inception=pt_inception.pth --config.eval.clip=/models/CLIP-ViT-H-14 \
    --config.eval.pickscore=/models/PickScore_v1

A set is `name:captions.csv[:fid_stats.npz]` (FID only for sets with statistics). Images are sampled scale-wise on
the run's schedule (its boundary sigmas), seeds `eval.seed + n` (the same images at every evaluation but for the
student), by `swd_jax.pipeline.SwDPipeline` over this host's devices with the run's base weights, the text
encoders and VAE of the source pipeline folder (model.path, or the `source` a converted checkpoint records).
Process 0 evaluates; the student is gathered from all processes first. Off (every = 0) by default.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from swd_jax.convert.converted import META, model_kind
from swd_jax.convert.folders import NOT_TRANSFORMER, from_hub
from swd_jax.train.config_loading import ConfigError


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    captions: str
    fid_stats: str | None


def parse_sets(sets) -> list[PromptSet]:
    """`eval.sets` entries `name:captions.csv[:fid_stats.npz]` -> PromptSets (files must exist)."""
    out = []
    for entry in sets:
        parts = str(entry).split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ConfigError(f"eval.sets entry {entry!r}: expected name:captions.csv[:fid_stats.npz]")
        for path in parts[1:]:
            if not os.path.exists(path):
                raise ConfigError(f"eval.sets entry {entry!r}: {path} does not exist")
        out.append(PromptSet(parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return out


def pipeline_folder(model_path: str) -> str:
    """The diffusers pipeline folder whose text encoders and VAE the evaluation uses (a Hub id: its snapshot)."""
    model_path = from_hub(model_path, NOT_TRANSFORMER, "model.path")
    kind = model_kind(model_path)
    if kind == "pipeline":
        return model_path
    if kind == "converted":
        with open(os.path.join(model_path, META)) as f:
            source = json.load(f).get("source", "")
        parent = os.path.dirname(os.path.normpath(source))
        for folder in (source, parent):
            if folder and model_kind_or_none(folder) == "pipeline":
                return folder
    raise ConfigError(f"config.eval needs the diffusers pipeline folder (text encoders, VAE): model.path {model_path} "
                      "is not one and does not record one")


def model_kind_or_none(path: str) -> str | None:
    try:
        return model_kind(path)
    except FileNotFoundError:
        return None


class TrainingEvaluator:
    """Built once per run (models loaded, prompts read); called with (step, state) -> {metric: value}."""

    def __init__(self, run):
        from swd_jax.eval.fid import FIDScorer
        from swd_jax.eval.prompts import read_captions
        from swd_jax.eval.protocol import Evaluator
        c = run.config
        e = c.eval
        self.unrolled = run.unrolled_arrays
        self.sets = parse_sets(e.sets)
        if not self.sets:
            raise ConfigError("eval.every > 0 needs eval.sets (name:captions.csv[:fid_stats.npz], ...)")
        if any(s.fid_stats for s in self.sets) and not e.inception:
            raise ConfigError("eval.sets with FID statistics need eval.inception (pt_inception-2015-12-05 weights)")
        self.prompts = {s.name: read_captions(s.captions, e.num_samples) for s in self.sets}
        self.every, self.seed, self.batch = int(e.every), int(e.seed), int(e.batch)
        self.run = run
        self.evaluator = Evaluator.load(clip=e.clip or None, pickscore=e.pickscore or None,
                                        processor=(e.processor or e.clip or e.pickscore) or None)
        if e.inception:
            self.evaluator.fid = FIDScorer(e.inception)
            self.ref_stats = {s.name: self.evaluator.fid.reference_stats(s.fid_stats)
                              for s in self.sets if s.fid_stats}
        else:
            self.ref_stats = {}
        self.pipe = None
        if jax.process_index() == 0:
            self.pipe = self._pipeline(run, c)

    @staticmethod
    def _pipeline(run, c):
        from swd_jax.convert.vae import load_vae
        from swd_jax.pipeline import SwDPipeline, Student
        from swd_jax.convert.prompt_encoding import SD3PromptEncoder
        folder = pipeline_folder(c.model.path)
        dtype = c.model.dtype if c.model.dtype in ("float32", "bfloat16") else "float32"
        pdt = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
        vae, vae_params = load_vae(os.path.join(folder, "vae"), pdt, pdt)
        encoder = SD3PromptEncoder(folder, max_sequence_length=c.data.max_sequence_length, dtype=pdt, param_dtype=pdt,
                                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        lora = run.models.transformer.lora
        # The pipeline runs the unrolled model: base and student in the stored layout (`Run.unrolled`).
        zeros = jax.tree.map(np.zeros_like, _host(run.unrolled_arrays(run.state["student"])))
        student = Student(lora, zeros, "training", run.models.schedule)
        base = jax.tree.map(lambda x: np.asarray(x, pdt), _host(run.unrolled_arrays(run.base)))
        return SwDPipeline(run.transformer_config, base, encoder, vae, vae_params, student=student, dtype=dtype,
                           mesh=mesh, model_folder=folder, transformer_source=c.model.path)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, step: int, state) -> dict:
        """Sample and score every set with the student in `state`; {"eval/<set>/<metric>": value}."""
        from swd_jax.eval.protocol import evaluate_images
        student = _host(self.unrolled(state["student"]))  # a collective on several processes: all call this
        if self.pipe is None:
            return {}
        self.pipe.lora = jax.device_put(student, self.pipe.replicated)
        sampler = self.pipe.sampler("scale_wise")
        out = {}
        for s in self.sets:
            images = self.pipe.generate(self.prompts[s.name], sampler, seed=self.seed, batch_size=self.batch)
            metrics = [m for m in ("clip_score", "pickscore") if m in self.evaluator.available()]
            if s.name in self.ref_stats:
                self.evaluator.ref_stats = self.ref_stats[s.name]
                metrics.append("fid")
            values = evaluate_images(list(images), self.prompts[s.name], self.evaluator, metrics)
            out.update({f"eval/{s.name}/{m}": float(v) for m, v in values.items() if m != "num_images"})
        return out


def _host(tree):
    """A (possibly multi-process sharded) pytree as numpy on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
