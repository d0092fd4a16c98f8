"""Images stage: checks, hashes, exact and near dedup over img2dataset output (Beam), and the rebalancing pass.

Pure functions live in ``checks`` and ``near_dedup`` (hashing is shared with decontamination in
``pipelines.decontam.hashing``); Beam composites in ``transforms``; the runnable entry points in ``stage``.
"""
