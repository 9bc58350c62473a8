"""The paper's evaluation protocol as a library: `Evaluator.load(...)` once, `evaluate_images(...)` per run.

Metrics (yandex-research/swd `metrics.calculate_scores`): `fid` (pytorch-fid Inception, official image
chain, against reference statistics), `clip_score` (CLIP ViT-H-14 laion2B) and `pickscore` (PickScore_v1),
each the mean per-pair cosine of `calc_pick_and_clip_scores` (papers often print x100). Images stream through
in chunks, so thousands of 1024 px images never sit in memory at once; the trainer can call
`evaluate_images` on a few hundred decoded samples.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from swd_jax import storage
from swd_jax.convert.folders import local_path
from swd_jax.eval import fid as fid_lib
from swd_jax.eval import image_chain
from swd_jax.eval.scores import ClipScorer, load_tokenizer, tokenize

METRICS = ("fid", "clip_score", "pickscore")


@dataclasses.dataclass
class Evaluator:
    """Loaded metric models; a metric whose model (or FID reference) is None cannot be asked for."""

    fid: fid_lib.FIDScorer | None = None
    ref_stats: tuple[np.ndarray, np.ndarray] | None = None
    clip: ClipScorer | None = None
    pickscore: ClipScorer | None = None
    tokenizer: object | None = None
    preprocess: image_chain.ClipPreprocess = image_chain.ClipPreprocess()

    @classmethod
    def load(cls, *, inception: str | None = None, fid_stats: str | None = None, real_images: str | None = None,
             clip: str | None = None, pickscore: str | None = None, processor: str | None = None,
             fid_batch_size: int = 50, clip_batch_size: int = 8, progress: Callable | None = None) -> "Evaluator":
        """Load what the given paths allow: FID needs `inception` and `fid_stats` (.npz) or `real_images` (a
        folder); CLIP score / PickScore need their CLIPModel folders, and the laion processor (`processor`,
        default the `clip` folder) for the tokenizer and preprocessing. Any path may be gs:// (a cached local copy);
        the CLIP folders may be Hub ids (ORG/NAME[@REV], e.g. yuvalkirstain/PickScore_v1)."""
        ev = cls()
        inception, fid_stats, real_images = (
            None if p is None else storage.local_copy(storage.resolve(p), what=what) for p, what in (
                (inception, "Inception weights"), (fid_stats, "FID statistics"), (real_images, "real image folder")))
        clip, pickscore, processor = (  # folders, gs:// folders or Hub ids (a snapshot in the Hub's cache)
            None if p is None else local_path(p, what=what) for p, what in (
                (clip, "CLIP model folder"), (pickscore, "PickScore model folder"), (processor, "CLIP processor")))
        if (fid_stats or real_images) and not inception:
            raise ValueError("FID needs --inception (pytorch-fid's pt_inception-2015-12-05 weights)")
        if fid_stats and real_images:
            raise ValueError("give FID reference statistics (--fid-stats) or real images (--real-images), not both")
        if inception:
            if not (fid_stats or real_images):
                raise ValueError("FID needs reference statistics: --fid-stats X.npz or --real-images DIR")
            ev.fid = fid_lib.FIDScorer(inception, batch_size=fid_batch_size)
            ev.ref_stats = ev.fid.reference_stats(fid_stats or real_images, progress)
        processor = processor or clip
        if (clip or pickscore) and not processor:
            raise ValueError("PickScore needs the laion CLIP-ViT-H-14 processor folder (--processor or --clip)")
        if processor:
            ev.tokenizer = load_tokenizer(processor)
            ev.preprocess = image_chain.ClipPreprocess.from_folder(processor)
        for name, folder in (("clip", clip), ("pickscore", pickscore)):
            if folder:
                scorer = ClipScorer(folder, batch_size=clip_batch_size)
                scorer.check_preprocess(ev.preprocess)
                setattr(ev, name, scorer)
        return ev

    def available(self) -> tuple[str, ...]:
        have = {"fid": self.fid is not None, "clip_score": self.clip is not None,
                "pickscore": self.pickscore is not None}
        return tuple(m for m in METRICS if have[m])


def evaluate_images(images: Iterable, prompts: Sequence[str], evaluator: Evaluator,
                    metrics: Sequence[str] | None = None, chunk: int = 200,
                    progress: Callable[[int], None] | None = None) -> dict:
    """{metric: value, "num_images": N} for uint8 [H, W, 3] images (any iterable: arrays, PIL images, a lazy
    loader) paired with `prompts`; `metrics` defaults to all the evaluator can compute. Images go through the
    official 512 px resize, then each metric's own preprocessing."""
    metrics = tuple(metrics or evaluator.available())
    missing = [m for m in metrics if m not in evaluator.available()]
    if missing:
        raise ValueError(f"metrics {missing} need models that were not loaded (have: {evaluator.available()})")
    want_clip = [m for m in ("clip_score", "pickscore") if m in metrics]
    scorers = {"clip_score": evaluator.clip, "pickscore": evaluator.pickscore}
    if want_clip:
        ids, mask = tokenize(evaluator.tokenizer, prompts)
    feats, scores, n = [], {m: [] for m in want_clip}, 0

    def run(batch):
        nonlocal n
        imgs = [image_chain.official_512(im) for im in batch]
        if "fid" in metrics:
            feats.append(evaluator.fid.features_of_inputs([image_chain.fid_input(im) for im in imgs]))
        if want_clip:
            if n + len(imgs) > len(prompts):
                raise ValueError(f"more images than prompts ({len(prompts)})")
            pix = np.stack([image_chain.clip_input(im, evaluator.preprocess) for im in imgs])
            for m in want_clip:
                scores[m].append(scorers[m].score(pix, ids[n:n + len(imgs)], mask[n:n + len(imgs)]))
        n += len(imgs)
        if progress is not None:
            progress(len(imgs))

    batch = []
    for im in images:
        batch.append(im)
        if len(batch) == chunk:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if want_clip and n != len(prompts):
        raise ValueError(f"{n} images but {len(prompts)} prompts")
    out = {"num_images": n}
    if "fid" in metrics:
        out["fid"] = fid_lib.frechet_distance(*fid_lib.feature_stats(np.concatenate(feats)), *evaluator.ref_stats)
    for m in want_clip:
        out[m] = float(np.mean(np.concatenate(scores[m])))
    return out
