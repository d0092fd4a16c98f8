"""Evaluation-set decontamination: perceptual-hash index with robustness variants, multi-index Hamming search,
a stricter re-aligned verification, a Beam step that drops matching pool samples, and contamination audits.

The names below are loaded on first use: importing a submodule (``pipelines.decontam.hashing``) does not import
the detector."""
import importlib

_EXPORTS = {
    "DetectorConfig": "pipelines.decontam.detector",
    "EvalIndex": "pipelines.decontam.detector",
    "Match": "pipelines.decontam.detector",
    "find_matches": "pipelines.decontam.detector",
    "match_batch": "pipelines.decontam.detector",
    "dhash64_batch": "pipelines.decontam.hashing",
    "hamming": "pipelines.decontam.hashing",
    "phash64_batch": "pipelines.decontam.hashing",
    "MultiIndexHash": "pipelines.decontam.mih",
    "brute_force_search": "pipelines.decontam.mih",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines.decontam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
