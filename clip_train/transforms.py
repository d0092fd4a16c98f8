"""Image transforms for CLIP with PIL, numpy and torch only: random-resized crop for training, resize + centre crop
for evaluation, then normalisation with CLIP's mean and standard deviation."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# The statistics CLIP was trained with (OpenAI's preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_normalized_tensor(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) normalised with a mean/std (CLIP's by default)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class EvalTransform:
    """open_clip's / torchvision's evaluation transform, exactly: resize the shorter side to `size` (bicubic, the
    longer side to int(size * long / short)), centre-crop size x size (offsets rounded as torchvision does),
    normalise. (Images are converted to RGB first; open_clip converts after resizing, which only matters for
    palette or alpha images.)"""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        size = self.size
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        if (left, top, new_w, new_h) != (0, 0, size, size):
            image = image.crop((left, top, left + size, top + size))
        return to_normalized_tensor(image, self.mean, self.std)


def eval_transform_for(model) -> EvalTransform:
    """The evaluation transform of a model: its image size and the mean/std of its config (CLIP's by default)."""
    vision = model.config.vision_cfg
    return EvalTransform(model.image_size, vision.image_mean or CLIP_MEAN, vision.image_std or CLIP_STD)


class TrainTransform:
    """torchvision's RandomResizedCrop algorithm (area fraction in `scale`, log-uniform aspect ratio), normalise.

    The random generator is injected so the data loader can seed it per (seed, epoch, rank, worker).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        # Fallback: the largest centred crop with an allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = image.convert("RGB")
        box = self.crop_box(*image.size, rng)
        return to_normalized_tensor(image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box))
