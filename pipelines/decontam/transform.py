"""Decontamination in the build: a Beam PTransform that drops pool records matching an evaluation-set index, and
the same as a plain function over (uid, image bytes) pairs."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict

import apache_beam as beam
import pyarrow as pa

from pipelines.decontam.detector import DetectorConfig, EvalIndex, decode_pool_image, find_matches, match_batch
from pipelines.evalsets import load_eval_set
from schemas import conform
from schemas import eval_match as eval_match_schema

MATCHES = "matches"
REJECTED = "rejected"


def build_index(eval_specs: Sequence[str], out_path: str | None = None) -> EvalIndex:
    """Index every example of the named evaluation sets (and save it to ``out_path`` when given)."""
    index = EvalIndex.from_eval_sets([load_eval_set(s) for s in eval_specs])
    if out_path:
        index.save(out_path)
    return index


def matches_table(matches: Iterable) -> pa.Table:
    rows = [m if isinstance(m, dict) else asdict(m) for m in matches]
    cols = {f.name: [r.get(f.name) for r in rows] for f in eval_match_schema.SCHEMA}
    return conform(pa.table(cols) if rows else eval_match_schema.SCHEMA.empty_table(), eval_match_schema.SCHEMA,
                   where="decontam matches")


def decontaminate_pool(pool_images: Iterable[tuple[str, bytes]], eval_specs: Sequence[str] | EvalIndex,
                       cfg: DetectorConfig | None = None, errors: list[str] | None = None) -> pa.Table:
    """Match (uid, encoded image) pool items against evaluation sets; returns the eval_match table.

    ``eval_specs`` is a list of evaluation-set specs (indexed here) or an already built :class:`EvalIndex`.
    The pool uids to drop are ``set(table["pool_key"])``; unreadable images are listed in ``errors``.
    """
    index = eval_specs if isinstance(eval_specs, EvalIndex) else build_index(eval_specs)
    return matches_table(find_matches(index, pool_images, cfg, errors=errors))


class _MatchBatch(beam.DoFn):
    """Matches a batch of records against the index (loaded once per worker in setup)."""

    def __init__(self, index_path: str, cfg: DetectorConfig, image_key: str, uid_key: str):
        self.index_path, self.cfg, self.image_key, self.uid_key = index_path, cfg, image_key, uid_key
        self.index = None
        self.n_dropped = beam.metrics.Metrics.counter("decontam", "dropped")
        self.n_kept = beam.metrics.Metrics.counter("decontam", "kept")
        self.n_unreadable = beam.metrics.Metrics.counter("decontam", "unreadable")

    def setup(self):
        self.index = EvalIndex.load(self.index_path)

    def process(self, batch):
        keys, imgs, recs = [], [], []
        for rec in batch:
            uid = str(rec[self.uid_key])
            try:
                imgs.append(decode_pool_image(rec[self.image_key]))
            except Exception as exc:  # a bad record is rejected with a reason, never a crash
                self.n_unreadable.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, {"uid": uid, "stage": "decontam",
                                                          "reason": f"unreadable image ({type(exc).__name__})"})
                continue
            keys.append(uid)
            recs.append(rec)
        matches, _ = match_batch(self.index, keys, imgs, self.cfg) if keys else ([], [])
        hit = {m.pool_key for m in matches}
        for m in matches:
            yield beam.pvalue.TaggedOutput(MATCHES, asdict(m))
        for uid, rec in zip(keys, recs):
            if uid in hit:
                self.n_dropped.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, {"uid": uid, "stage": "decontam",
                                                          "reason": "near-duplicate of an evaluation image"})
            else:
                self.n_kept.inc()
                yield rec


class Decontaminate(beam.PTransform):
    """Records (dicts with ``uid`` and encoded image bytes) -> kept records, plus tagged outputs ``matches``
    (eval_match rows) and ``rejected`` ({uid, stage, reason}: every dropped or unreadable record).

        out = records | Decontaminate(index_path)
        out.kept, out.matches, out.rejected
    """

    def __init__(self, eval_index_path: str, cfg: DetectorConfig | None = None, *, image_key: str = "jpg",
                 uid_key: str = "uid", batch_size: int = 256):
        super().__init__()
        self.eval_index_path, self.cfg = eval_index_path, cfg or DetectorConfig()
        self.image_key, self.uid_key, self.batch_size = image_key, uid_key, batch_size

    def expand(self, records):
        out = (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "Match" >> beam.ParDo(_MatchBatch(self.eval_index_path, self.cfg, self.image_key, self.uid_key))
            .with_outputs(MATCHES, REJECTED, main="kept")
        )
        return out
