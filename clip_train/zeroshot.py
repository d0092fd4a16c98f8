"""Zero-shot classification with CLIP: template-ensemble class embeddings, image features, top-k and per-class recall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clip_train.model import CLIP
from clip_train.transforms import eval_transform_for


@torch.no_grad()
def zeroshot_classifier(
    model: CLIP, tokenizer, class_names: Sequence[str], templates: Sequence[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(D, C) matrix: per class, the mean of the normalised text embeddings of all templates, renormalised (CLIP)."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    weights = []
    for name in class_names:
        texts = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = model.encode_text(texts, normalize=True)
        mean = embeddings.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


@torch.no_grad()
def image_features(
    model: CLIP, eval_set, device: str | torch.device = "cpu", batch_size: int = 256
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Normalised image features (N, D) on CPU, labels (N,), ids — images centre-cropped to the model's size."""
    transform = eval_transform_for(model)
    feats, labels, ids, batch = [], [], [], []

    def flush() -> None:
        if batch:
            feats.append(model.encode_image(torch.stack(batch).to(device), normalize=True).float().cpu())
            batch.clear()

    for example in eval_set:
        batch.append(transform(example.image))
        labels.append(example.label)
        ids.append(example.id)
        if len(batch) == batch_size:
            flush()
    flush()
    if not feats:
        raise ValueError(f"evaluation set {getattr(eval_set, 'name', eval_set)!r} is empty")
    return torch.cat(feats), np.asarray(labels, dtype=np.int64), ids


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top-1, top-5 (top-k with k = min(5, classes)), mean per-class recall over the classes present, per-class recall."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    k = min(5, num_classes)
    # Stable ordering so ties resolve the same way everywhere (lowest class index first).
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    topk = (order[:, :k] == labels[:, None]).any(axis=1)
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            per_class[c] = float(top1[mask].mean())
    return {
        "zeroshot_top1": float(top1.mean()),
        "zeroshot_top5": float(topk.mean()),
        "mean_per_class_recall": float(np.mean(list(per_class.values()))),
        "per_class_recall": per_class,
        "n": int(labels.shape[0]),
    }


@torch.no_grad()
def zeroshot_logits(
    model: CLIP, tokenizer, eval_set, device: str | torch.device = "cpu", batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, list[str], torch.Tensor]:
    """(logits (N, C), labels, ids, image features) for an evaluation set."""
    classifier = zeroshot_classifier(model, tokenizer, eval_set.class_names, eval_set.templates, device).float().cpu()
    feats, labels, ids = image_features(model, eval_set, device, batch_size)
    # Scaled like the model's logits; the scale changes no ranking.
    logits = 100.0 * feats @ classifier
    return logits.numpy(), labels, ids, feats
