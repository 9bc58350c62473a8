"""The official evaluation's image preprocessing (yandex-research/swd `src/evaluation/`), with PIL.

Generated image (1024 px) --official_512--> 512 x 512, then
- FID (`fid_score_in_memory.get_activations`): torchvision `Resize(256, LANCZOS)` (shorter side to 256),
  `CenterCrop(256)`, `ToTensor()` ([0, 1] float32); the Inception model then resizes to 299 bilinearly.
- CLIP score / PickScore (transformers `CLIPImageProcessor` of laion/CLIP-ViT-H-14): shorter side to 224
  bicubic, center crop 224, x / 255, (x - mean) / std. This is the PIL path (`CLIPImageProcessorPil`);
  transformers 5's default processor does the same with torchvision's antialiased bicubic on uint8 tensors,
  which agrees with PIL to about one grey level on a few pixels.
All functions take and return numpy HWC arrays (uint8 in, float32 out), one image at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

OFFICIAL_SIZE = 512  # eval.distributed_sampling: `images[i].resize((512, 512))` (PIL's default: bicubic)
FID_SIZE = 256
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """uint8 [H, W, 3] (or a PIL image) -> RGB PIL image; anything else raises."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return Image.fromarray(image, "RGB")


def official_512(image: np.ndarray | Image.Image) -> Image.Image:
    """The official sampler's `PIL.Image.resize((512, 512))` (bicubic) of a generated image."""
    return to_pil(image).resize((OFFICIAL_SIZE, OFFICIAL_SIZE), Image.Resampling.BICUBIC)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side `size` (torchvision's and transformers' rule: the longer
    side truncated, `int(size * long / short)`)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def fid_input(image: np.ndarray | Image.Image) -> np.ndarray:
    """torchvision `Compose([Resize(256, LANCZOS), CenterCrop(256), ToTensor()])` -> float32 [256, 256, 3]."""
    img = to_pil(image)
    img = img.resize(shorter_side_size(*img.size, FID_SIZE), Image.Resampling.LANCZOS)
    w, h = img.size
    top, left = int(round((h - FID_SIZE) / 2.0)), int(round((w - FID_SIZE) / 2.0))  # torchvision center_crop
    img = img.crop((left, top, left + FID_SIZE, top + FID_SIZE))
    return np.asarray(img, np.float32) / np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """The fields of a CLIP `preprocessor_config.json` the scorer uses (defaults: laion/CLIP-ViT-H-14's)."""

    shortest_edge: int = 224
    crop_size: int = 224
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_folder(cls, folder: str) -> "ClipPreprocess":
        """Read `preprocessor_config.json` if the folder has one (bicubic, resize + crop + rescale + normalise
        required), else the defaults."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            raw = json.load(f)
        for key, want in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True),
                          ("do_normalize", True), ("resample", 3)):
            if raw.get(key, want) != want:
                raise ValueError(f"{path}: {key}={raw[key]!r} unsupported (the CLIP scorer needs {want!r})")
        if abs(raw.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
            raise ValueError(f"{path}: rescale_factor {raw['rescale_factor']} unsupported (1/255 only)")
        size, crop = raw.get("size", 224), raw.get("crop_size", 224)
        size = size["shortest_edge"] if isinstance(size, dict) else size
        if isinstance(crop, dict):
            if crop["height"] != crop["width"]:
                raise ValueError(f"{path}: non-square crop_size {crop} unsupported")
            crop = crop["height"]
        return cls(int(size), int(crop), tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(raw.get("image_std", OPENAI_CLIP_STD)))


def clip_input(image: np.ndarray | Image.Image, pre: ClipPreprocess = ClipPreprocess()) -> np.ndarray:
    """`CLIPImageProcessor` (PIL path): shorter side bicubic, center crop, rescale, normalise -> float32 HWC."""
    img = to_pil(image)
    img = img.resize(shorter_side_size(*img.size, pre.shortest_edge), Image.Resampling.BICUBIC)
    x = np.asarray(img)
    h, w = x.shape[:2]
    c = pre.crop_size
    if h < c or w < c:
        raise ValueError(f"CLIP preprocessing: {w}x{h} image is smaller than the {c} px crop")
    top, left = (h - c) // 2, (w - c) // 2  # transformers' center_crop
    x = (x[top:top + c, left:left + c].astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(pre.image_mean, np.float32), np.asarray(pre.image_std, np.float32)
    return (x - mean) / std
