"""AdamW parameter groups (decay on weights only) and the cosine learning-rate schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

# Names of parameters that are embeddings or the temperature: never decayed even when they are matrices.
NO_DECAY_NAME_PARTS = ("embedding", "logit_scale")


def exclude_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains and biases (every parameter with fewer than 2 dims: LayerNorm/BatchNorm weights, biases, class token),
    embeddings (token, positional, attention-pool positions) and the logit scale."""
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.2, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW (decoupled decay) with CLIP's beta2 = 0.98 and eps = 1e-6."""
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **extra)


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """LR multiplier at optimiser step `step` (0-based): linear warm-up to 1, then half-cosine decay to min_factor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr_factor(step, warmup_steps, total_steps))
