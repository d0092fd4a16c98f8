"""Evaluation-set decontamination: perceptual-hash index with robustness variants, multi-index Hamming search,
a stricter re-aligned verification, a Beam step that drops matching pool samples, and contamination audits.

The names below are loaded on first use: importing a submodule (``pipelines.decontam.hashing``) does not import
the detector."""
from pipelines.core.lazy import lazy_exports

_MODULES = {
    "pipelines.decontam.detector": ("DetectorConfig", "EvalIndex", "Match", "find_matches", "match_batch"),
    "pipelines.decontam.hashing": ("dhash64_batch", "hamming", "phash64_batch"),
    "pipelines.decontam.mih": ("MultiIndexHash", "brute_force_search"),
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
