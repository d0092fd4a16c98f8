"""CLIP-score filtering as a build stage (DataComp's baseline family; ``--filter clip_score:threshold=X`` or
``clip_score:top_fraction=F`` with ``--filter-checkpoint MODEL``).

Input: the pool's ``ok`` rows that earlier stages kept (the pool minus the decontamination drop list). Every such
sample is scored with the model's own preprocessing and tokenizer (cosine of the normalised image and caption
embeddings, :func:`clip_train.clip_score.score_samples`), on any Beam runner: chunks of pool rows by crawl tar
(:mod:`pipelines.images.pool_chunks`), the model loaded once per worker. The driver applies the rule
(:func:`clip_train.clip_score.clip_score_drops`: a threshold, or the best round(F * n) with ties broken by uid; a
sample without a score -- undecodable image -- is dropped) and writes, atomically, marker last:

    CLIP_SCORE/scores.parquet   uid, clip_score of every input row (model fingerprint in the file's metadata)
    CLIP_SCORE/drop.parquet     the uids to leave out (the balance stage excludes them)
    rejected rows               stage ``clip_score``, reason ``low_clip_score``, source ``clip_score=<value>``

The stage's fingerprint covers the pool, the earlier drop lists, the rule and the checkpoint's content (its files'
hashes, not its path), so a new model or a new rule rescoring/refiltering is never skipped by mistake.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipelines.core import reasons, storage
from pipelines.core.config import Config, check
from pipelines.core.errors import ConfigError
from pipelines.core.stage import Stage, StageResult
from schemas import conform
from schemas import rejected as rejected_schema

STAGE = reasons.CLIP_SCORE
CHUNK = 256


@dataclass(frozen=True)
class ClipScoreConfig(Config):
    """The model and the rule: exactly one of ``threshold`` (drop score < X) and ``top_fraction`` (keep the best
    fraction F). ``model_config``: an open_clip / clip_train config for weights that carry none."""

    checkpoint: str
    threshold: float | None = None
    top_fraction: float | None = None
    model_config: str | None = None
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self):
        from clip_train.clip_score import _check_rule

        check(bool(self.checkpoint), "clip_filter.checkpoint", "expected a model (run directory, open_clip or "
                                                               "OpenAI checkpoint)")
        _check_rule(self.threshold, self.top_fraction, "clip_filter")
        check(isinstance(self.batch_size, int) and self.batch_size > 0, "clip_filter.batch_size",
              f"expected a positive integer, got {self.batch_size!r}")

    @classmethod
    def from_spec(cls, spec: str, checkpoint: str, **kw) -> "ClipScoreConfig":
        """``clip_score:threshold=X`` / ``clip_score:top_fraction=F`` (the CLI's --filter) with a checkpoint."""
        from clip_train.clip_score import parse_clip_score_filter

        return cls(checkpoint=checkpoint, **parse_clip_score_filter(spec), **kw)

    def rule(self) -> str:
        return f"threshold={self.threshold:g}" if self.threshold is not None else f"top_fraction={self.top_fraction:g}"


def checkpoint_fingerprint(checkpoint: str) -> str:
    """Content hash of the files that define the model (a copy or a move of the checkpoint keeps it)."""
    from clip_train.interop import fingerprint_files
    from clip_train.reuse import model_files

    files = [str(f) for f in model_files(checkpoint)]
    if not files or not all(storage.exists(f) for f in files):
        raise ConfigError(f"clip_filter.checkpoint: {checkpoint}: no such checkpoint file or run directory")
    return fingerprint_files(files)


class _ScoreChunk(beam.DoFn):
    """Score one chunk of pool rows; the model is loaded once per worker. Emits (uid, score) pairs and the
    counts of samples that could not be scored, never images."""

    def __init__(self, cfg: ClipScoreConfig):
        self.cfg = cfg
        self.loaded = None

    def setup(self):
        from clip_train.interop import load_any

        self.loaded = load_any(self.cfg.checkpoint, self.cfg.device, model_config=self.cfg.model_config)
        self.loaded.model.eval()

    def process(self, chunk):
        from clip_train.clip_score import score_samples
        from pipelines.shard.writer import _read_images

        images = _read_images(chunk)
        samples = ({"__key__": r["uid"], "jpg": images[r["uid"]], "txt": (r["caption"] or "").encode()} for r in chunk)
        uids, scores, skipped = score_samples(self.loaded, samples, self.cfg.batch_size, self.cfg.device)
        yield {"uids": uids, "scores": [None if math.isnan(s) else s for s in scores], "skipped": skipped,
               "model_fingerprint": self.loaded.fingerprint(), "model_format": self.loaded.format}


class ClipScoreStage(Stage):
    """inputs: ``{"pool": POOL_DIR, "exclude": [drop lists of earlier stages]}``; output: the clip_score directory;
    ``rejected``: one Parquet file."""

    name = STAGE

    def exclude(self) -> list[str]:
        return sorted(self.inputs.get("exclude") or [])

    def input_files(self) -> list[str]:
        from pipelines.images.stage import pool_files

        return pool_files(self.inputs["pool"]) + self.exclude()

    def extra_fingerprint(self):
        return {"model": checkpoint_fingerprint(self.config.checkpoint)}

    def compute(self, fingerprint: str) -> StageResult:
        from clip_train.clip_score import SCORE_COLUMN, clip_score_drops
        from pipelines.images.pool_chunks import excluded_uids, map_pool_chunks
        from pipelines.images.stage import pool_files, read_rows

        cfg, out = self.config, self.output
        files = pool_files(self.inputs["pool"])
        exclude = excluded_uids(self.exclude())
        parts = map_pool_chunks(files, _ScoreChunk(cfg), summary_uri=storage.join(out, "_chunks.json"),
                                beam_args=self.beam_args, chunk_rows=CHUNK, columns=["caption"], exclude=exclude)
        pairs = sorted((u, s) for part in parts for u, s in zip(part["uids"], part["scores"]))
        uids = [u for u, _s in pairs]
        scores = [float("nan") if s is None else float(s) for _u, s in pairs]
        skipped: dict[str, int] = {}
        for part in parts:
            for k, v in part["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        model_fp = {p["model_fingerprint"] for p in parts}
        if len(model_fp) > 1:
            raise RuntimeError(f"workers loaded different models for {cfg.checkpoint}: {sorted(model_fp)}")
        model = {"checkpoint": cfg.checkpoint, "fingerprint": next(iter(model_fp), None),
                 "format": parts[0]["model_format"] if parts else None}
        drops = clip_score_drops(uids, scores, threshold=cfg.threshold, top_fraction=cfg.top_fraction) if uids \
            else set()
        metadata = {"clipline.model_fingerprint": model["fingerprint"] or "", "clipline.model_format":
                    model["format"] or "", "clipline.checkpoint": cfg.checkpoint,
                    "clipline.score": "cosine(image, caption)", "clipline.rule": cfg.rule()}
        scores_uri, drop_uri = storage.join(out, "scores.parquet"), storage.join(out, "drop.parquet")
        rejected_uri = self.rejected or storage.join(storage.parent(out), "rejected", f"{STAGE}.parquet")
        table = pa.table({"uid": pa.array(uids, pa.string()), SCORE_COLUMN: pa.array(scores, pa.float32())})
        storage.write_table(scores_uri, table.replace_schema_metadata(metadata))
        storage.write_table(drop_uri, pa.table({"uid": pa.array(sorted(drops), pa.string())}))
        score_of = dict(zip(uids, scores))
        dropped = sorted((r for r in read_rows(files, columns=["uid", "url", "caption", "status"])
                          if r["status"] == "ok" and r["uid"] in drops), key=lambda r: r["uid"])
        rejected = pa.table({
            "uid": [r["uid"] for r in dropped], "url": [r["url"] for r in dropped],
            "caption": [r["caption"] for r in dropped], "stage": [STAGE] * len(dropped),
            "reason": [reasons.LOW_CLIP_SCORE] * len(dropped),
            "source": [f"clip_score={score_of[r['uid']]:.4f}" if not math.isnan(score_of[r["uid"]])
                       else "clip_score=none (image not decodable)" for r in dropped],
        })
        storage.write_table(rejected_uri, conform(rejected, rejected_schema.SCHEMA, where="clip_score rejected rows"))
        valid = np.array([s for s in scores if not math.isnan(s)])
        return StageResult(
            stage=STAGE, input_rows=len(uids), kept=len(uids) - len(dropped),
            rejected={reasons.LOW_CLIP_SCORE: len(dropped)},
            outputs={"scores": scores_uri, "drop": drop_uri, "rejected": rejected_uri},
            params=self.params(), fingerprint=fingerprint,
            details={"model": model, "rule": cfg.rule(), "scored": int(len(valid)),
                     "unscored": int(len(uids) - len(valid)), "skipped": skipped,
                     "score_mean": float(valid.mean()) if len(valid) else None,
                     "score_quantiles": {f"{q:g}": float(np.quantile(valid, q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)}
                     if len(valid) else {}})
