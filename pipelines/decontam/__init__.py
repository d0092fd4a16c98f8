"""Evaluation-set decontamination: perceptual-hash index with robustness variants, multi-index Hamming search,
a stricter re-aligned verification, a Beam step that drops matching pool samples, and contamination audits."""
from pipelines.decontam.detector import DetectorConfig, EvalIndex, Match, find_matches, match_batch
from pipelines.decontam.hashing import dhash64_batch, hamming, phash64_batch
from pipelines.decontam.mih import MultiIndexHash, brute_force_search

__all__ = ["DetectorConfig", "EvalIndex", "Match", "MultiIndexHash", "brute_force_search", "dhash64_batch",
           "find_matches", "hamming", "match_batch", "phash64_batch"]
