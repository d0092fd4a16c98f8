"""CLIP section 5 overlap statistics: accuracy on All / Clean / Overlap, a one-sided binomial test, 99.5% CIs."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from scipy import stats

CONFIDENCE = 0.995  # CLIP reports 99.5% Clopper-Pearson intervals


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def _subset(k: int, n: int, confidence: float) -> dict:
    lo, hi = clopper_pearson(k, n, confidence)
    return {"n": n, "correct": k, "accuracy": (k / n) if n else None, "ci": [lo, hi] if n else None}


def overlap_statistics(ids: Sequence[str], correct: Sequence[bool], overlap_ids: Iterable[str],
                       confidence: float = CONFIDENCE) -> dict:
    """Zero-shot accuracy split by overlap, as in CLIP (Radford et al. 2021, section 5).

    ``p_value`` is the one-sided binomial test of the Overlap subset's correct count against the Clean accuracy
    (alternative: Overlap accuracy is higher, i.e. contamination inflated it); ``all_minus_clean`` is the
    accuracy gained by evaluating on All instead of Clean. Undefined values (empty subsets) are None.
    """
    if len(ids) != len(correct):
        raise ValueError(f"{len(ids)} ids but {len(correct)} correctness flags")
    overlap = set(overlap_ids)
    k_all = sum(bool(c) for c in correct)
    k_ov = sum(bool(c) for i, c in zip(ids, correct) if i in overlap)
    n_ov = sum(1 for i in ids if i in overlap)
    n_all = len(ids)
    n_cl, k_cl = n_all - n_ov, k_all - k_ov
    out = {
        "all": _subset(k_all, n_all, confidence),
        "clean": _subset(k_cl, n_cl, confidence),
        "overlap": _subset(k_ov, n_ov, confidence),
        "confidence": confidence,
    }
    acc_all, acc_cl = out["all"]["accuracy"], out["clean"]["accuracy"]
    out["all_minus_clean"] = (acc_all - acc_cl) if acc_all is not None and acc_cl is not None else None
    if n_ov and n_cl:
        out["p_value"] = float(stats.binomtest(k_ov, n_ov, acc_cl, alternative="greater").pvalue)
    else:
        out["p_value"] = None
    return out
