"""Symmetric InfoNCE loss of CLIP, with feature gathering across data-parallel ranks.

Single process: cross-entropy of image->text and text->image logits against the diagonal, averaged.
Several ranks (as open_clip): features of all ranks are all-gathered without autograd and the local slice is replaced
by the local tensors, so gradients flow through this rank's features only; `local_loss=True` computes the loss of
the local rows against all gathered columns instead of the full N x N matrix; `gather_with_grad=True` gathers through
autograd so every rank's loss reaches every rank's features.

Scaling so that DistributedDataParallel's gradient *average* equals the gradient of the global loss:
- full matrix, no-grad gather: every rank computes the same global loss L but back-propagates only into its own
  features, so the sum over ranks of the local gradients is dL/dtheta; the backward value is scaled by world_size
  (the returned value stays L) so that DDP's mean gives dL/dtheta.
- gather_with_grad: autograd's all_gather back-propagates every rank's loss into every rank's features (summing
  over ranks), so DDP's mean is exact without scaling, for the full matrix and for the local loss (whose mean over
  ranks is L).
- local loss without gather_with_grad (open_clip's common setting): the gradient through the other ranks' features is
  dropped; this is the usual, slightly biased approximation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, gather_with_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate features of all ranks in rank order; the local slice keeps its autograd history."""
    if gather_with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(image_features), 0), torch.cat(dist_fn.all_gather(text_features), 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    images = [torch.empty_like(image_features) for _ in range(world)]
    texts = [torch.empty_like(text_features) for _ in range(world)]
    dist.all_gather(images, image_features.detach().contiguous())
    dist.all_gather(texts, text_features.detach().contiguous())
    images[rank], texts[rank] = image_features, text_features
    return torch.cat(images, 0), torch.cat(texts, 0)


def _scale_gradient(loss: torch.Tensor, factor: float) -> torch.Tensor:
    # Same value, gradient multiplied by factor.
    return loss * factor - loss.detach() * (factor - 1)


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Features are L2-normalised (B, D); logit_scale is exp(t). Returns the mean of both cross-entropies."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            return self._loss(image_features, text_features, image_features, text_features, logit_scale, 0)
        world, rank = dist.get_world_size(), dist.get_rank()
        all_images, all_texts = gather_features(image_features, text_features, self.gather_with_grad)
        if self.local_loss:
            offset = rank * image_features.shape[0]
            return self._loss(image_features, text_features, all_images, all_texts, logit_scale, offset)
        loss = self._loss(all_images, all_texts, all_images, all_texts, logit_scale, 0)
        return loss if self.gather_with_grad else _scale_gradient(loss, float(world))

    @staticmethod
    def _loss(
        images: torch.Tensor,
        texts: torch.Tensor,
        all_images: torch.Tensor,
        all_texts: torch.Tensor,
        logit_scale: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        # Row i of `images` is column offset + i of the gathered matrix: its positive caption.
        logits_per_image = logit_scale * images @ all_texts.T
        logits_per_text = logit_scale * texts @ all_images.T
        labels = torch.arange(images.shape[0], device=images.device) + offset
        return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


def in_batch_retrieval_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Fraction of images whose most similar caption in the batch is their own (mean of both directions)."""
    sims = image_features @ text_features.T
    target = torch.arange(sims.shape[0], device=sims.device)
    i2t = (sims.argmax(dim=1) == target).float().mean()
    t2i = (sims.argmax(dim=0) == target).float().mean()
    return float((i2t + t2i) / 2)
