"""Image<->text retrieval recall@K on a held-out captioned split (webdataset shards with `.jpg` + `.txt`)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clip_train.data import SkipCounter, raw_samples, resolve_shards
from clip_train.model import CLIP
from clip_train.transforms import eval_transform_for

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def recall_at_k(similarity: np.ndarray, caption_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """similarity: (images, captions); caption_image[j] is the image index of caption j (images may have several).

    image->text R@K: an image counts when any of its captions is among its K most similar captions.
    text->image R@K: a caption counts when its image is among its K most similar images.
    """
    similarity = np.asarray(similarity)
    caption_image = np.asarray(caption_image)
    n_images, n_captions = similarity.shape
    # Rank of each candidate = number of candidates scoring strictly higher (ties favour the correct one, as usual).
    out: dict[str, float] = {}
    correct_scores = similarity[caption_image, np.arange(n_captions)]  # per caption
    t2i_rank = (similarity > correct_scores[None, :]).sum(axis=0)
    best_i2t_rank = np.full(n_images, np.iinfo(np.int64).max)
    for j in range(n_captions):
        i = caption_image[j]
        rank = int((similarity[i] > similarity[i, j]).sum())
        best_i2t_rank[i] = min(best_i2t_rank[i], rank)
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((best_i2t_rank < k).mean())
        out[f"text_to_image_R@{k}"] = float((t2i_rank < k).mean())
    out["n_images"], out["n_captions"] = int(n_images), int(n_captions)
    return out


def load_captioned_pairs(spec: str, limit: int) -> tuple[list[Image.Image], list[str], list[str]]:
    """Up to `limit` (image, caption, key) triples from shards in order; unreadable samples are skipped."""
    skips = SkipCounter()
    images, captions, keys = [], [], []
    for sample in raw_samples(iter(resolve_shards(spec).urls), skips):
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "txt" not in sample:
            skips("sample lacks an image or a .txt caption", sample.get("__key__", "?"))
            continue
        try:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            caption = sample["txt"].decode("utf-8").strip()
        except Exception as exc:
            skips(f"unreadable sample ({type(exc).__name__})", sample.get("__key__", "?"))
            continue
        images.append(image.convert("RGB"))
        captions.append(caption)
        keys.append(sample["__key__"])
        if len(images) >= limit:
            break
    if not images:
        raise ValueError(f"retrieval set {spec!r} has no readable (image, caption) pairs")
    return images, captions, keys


@torch.no_grad()
def retrieval_metrics(
    model: CLIP, tokenizer, images: Sequence[Image.Image], captions: Sequence[str], device="cpu", batch_size: int = 256
) -> dict[str, float]:
    """One caption per image (caption i belongs to image i)."""
    transform = eval_transform_for(model)
    image_feats, text_feats = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start : start + batch_size]]).to(device)
        image_feats.append(model.encode_image(batch, normalize=True).float().cpu())
        tokens = tokenizer(list(captions[start : start + batch_size])).to(device)
        text_feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    similarity = (torch.cat(image_feats) @ torch.cat(text_feats).T).numpy()
    return recall_at_k(similarity, list(range(len(captions))))
