"""Linear probe: L2-regularised logistic regression on frozen image features, C chosen on a validation split
(the CLIP paper's protocol, with scikit-learn's L-BFGS solver)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

# Inverse regularisation strengths swept on the validation split (the paper sweeps 1e-6..1e6 in log steps;
# frozen normalised features of small models need nothing outside this range).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 7))


@dataclass
class ProbeResult:
    top1: float
    best_c: float
    val_accuracy: dict[float, float]
    n_train: int
    n_val: int
    n_test: int


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)


def split_for_validation(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified when every class has at least two examples."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    n_classes = int((counts > 0).sum())
    n_val = int(np.ceil(val_fraction * len(labels)))
    # Stratify when every class can appear on both sides; tiny sets fall back to a plain seeded split.
    can_stratify = counts[counts > 0].min() >= 2 and min(n_val, len(labels) - n_val) >= n_classes
    stratify = labels if can_stratify else None
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    return np.sort(train_idx), np.sort(val_idx)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeResult:
    """Sweep C on a held-out part of the training features, refit on all training features, score the test set."""
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("a linear probe needs training examples of at least two classes")
    fit_idx, val_idx = split_for_validation(train_y, val_fraction, seed)
    val_accuracy = {}
    for c in cs:
        model = _fit(train_x[fit_idx], train_y[fit_idx], c, seed)
        val_accuracy[float(c)] = float((model.predict(train_x[val_idx]) == train_y[val_idx]).mean())
    # Ties go to the strongest regularisation (smallest C), the safer choice.
    best_c = max(sorted(val_accuracy), key=lambda c: (val_accuracy[c], -c))
    final = _fit(train_x, train_y, best_c, seed)
    top1 = float((final.predict(test_x) == test_y).mean())
    return ProbeResult(top1, best_c, val_accuracy, len(fit_idx), len(val_idx), len(test_y))
