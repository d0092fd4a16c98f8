"""CLIP-score filtering (DataComp's strongest baseline family): per-sample image-text cosine similarity under a CLIP
model, and the pure selection rule that turns scores into the uids to drop.

- :func:`score_dataset` reads a build's shards (or any shard spec), embeds each image with the model's own
  preprocessing (:class:`clip_train.interop.LoadedModel.transform`) and its caption with the model's tokenizer, and
  writes ``uid, clip_score`` as Parquet (``BUILD/clip_score/scores.parquet`` by default), with the model's
  fingerprint, format and path in the file's metadata. A rerun with the same model and shards reuses the file
  (completion marker through :mod:`pipelines.core.markers`).
- :func:`clip_score_drops` (pure): given uids and scores and ``threshold=X`` (drop score < X) or
  ``top_fraction=F`` (keep the best round(F * n), DataComp's "top 30%"), the set of uids to drop. A sample without
  a score (NaN: its image could not be decoded) is dropped. :func:`parse_clip_score_filter` reads the build's
  ``--filter clip_score:threshold=X`` / ``clip_score:top_fraction=F`` spec.

The selection functions are pure and import no torch (a build flow can use them cheaply). The model can be any
checkpoint :func:`clip_train.interop.load_any` reads: a clipline run (the bootstrapped,
data-filtering-network loop: train on version N, filter version N+1), an open_clip checkpoint or OpenAI's weights.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np

from clip_train.errors import EvalError
from pipelines.core import markers, storage
from pipelines.core.errors import ConfigError

SCORES_NAME = "scores.parquet"
SCORE_COLUMN = "clip_score"


# --------------------------------------------------------------------------------------------- selection (pure)
def parse_clip_score_filter(spec: str) -> dict:
    """'clip_score:threshold=0.25' -> {"threshold": 0.25}; 'clip_score:top_fraction=0.3' -> {"top_fraction": 0.3}."""
    name, sep, rest = str(spec).partition(":")
    if name != "clip_score" or not sep:
        raise ConfigError(f"--filter {spec!r}: expected clip_score:threshold=X or clip_score:top_fraction=F")
    key, eq, value = rest.partition("=")
    if key not in ("threshold", "top_fraction") or not eq:
        raise ConfigError(f"--filter {spec!r}: expected clip_score:threshold=X or clip_score:top_fraction=F")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--filter {spec!r}: {value!r} is not a number") from None
    _check_rule(number if key == "threshold" else None, number if key == "top_fraction" else None, f"--filter {spec!r}")
    return {key: number}


def _check_rule(threshold: float | None, top_fraction: float | None, where: str = "clip_score filter") -> None:
    if (threshold is None) == (top_fraction is None):
        raise ConfigError(f"{where}: give exactly one of threshold or top_fraction")
    if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise ConfigError(f"{where}: threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if top_fraction is not None and not (0.0 < top_fraction <= 1.0):
        raise ConfigError(f"{where}: top_fraction must be in (0, 1], got {top_fraction}")


def clip_score_drops(uids: Sequence[str], scores: Sequence[float], *, threshold: float | None = None,
                     top_fraction: float | None = None) -> set[str]:
    """The uids to drop (reason ``low_clip_score``). Kept and dropped partition ``uids``; deterministic (ties in
    top_fraction are broken by uid). NaN / None scores are always dropped."""
    _check_rule(threshold, top_fraction)
    if len(uids) != len(scores):
        raise ValueError(f"{len(uids)} uids but {len(scores)} scores")
    if len(set(uids)) != len(uids):
        raise ValueError("uids are not unique")
    vals = np.array([np.nan if s is None else float(s) for s in scores], dtype=np.float64)
    valid = ~np.isnan(vals)
    if threshold is not None:
        keep = valid & (vals >= threshold)
        return {u for u, k in zip(uids, keep) if not k}
    n_keep = int(math.floor(top_fraction * len(uids) + 0.5))
    ranked = sorted((i for i in range(len(uids)) if valid[i]), key=lambda i: (-vals[i], uids[i]))
    kept = {uids[i] for i in ranked[:n_keep]}
    return {u for u in uids if u not in kept}


# ----------------------------------------------------------------------------------------------------- scoring
def shards_of(dataset: str) -> str:
    """A build directory -> its shards directory; any other spec is a shard spec as `clipline train --data` takes."""
    if storage.exists(storage.join(dataset, "manifest.json")) or storage.exists(storage.join(dataset, "shards", "sizes.json")):
        return storage.join(dataset, "shards")
    return dataset


def default_output(dataset: str) -> str:
    if storage.exists(storage.join(dataset, "manifest.json")) or storage.exists(storage.join(dataset, "shards", "sizes.json")):
        return storage.join(dataset, "clip_score", SCORES_NAME)
    raise EvalError(f"{dataset}: not a build directory; pass --out FILE.parquet")


def score_samples(loaded, samples, batch_size: int = 256, device: str = "cpu") -> tuple[list[str], list[float], dict]:
    """(uids, scores, skip counts) for an iterable of raw webdataset samples (dicts with __key__, jpg/png, txt, json)."""
    import torch
    from PIL import Image

    from clip_train.data import IMAGE_EXTENSIONS, sample_meta

    model, tokenizer, transform = loaded.model, loaded.tokenizer, loaded.transform
    uids: list[str] = []
    scores: list[float] = []
    skipped: dict[str, int] = {}
    batch_images, batch_texts, batch_pos = [], [], []

    @torch.no_grad()
    def flush() -> None:
        if not batch_images:
            return
        image = model.encode_image(torch.stack(batch_images).to(device), normalize=True).float()
        text = model.encode_text(tokenizer(batch_texts).to(device), normalize=True).float()
        sims = (image * text).sum(dim=-1).cpu().tolist()
        for pos, sim in zip(batch_pos, sims):
            scores[pos] = float(sim)
        batch_images.clear(), batch_texts.clear(), batch_pos.clear()

    for sample in samples:
        meta = sample_meta(sample)
        uid = str(meta.get("uid") or sample.get("__key__"))
        uids.append(uid)
        scores.append(float("nan"))
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
            if ext is None or not caption:
                raise ValueError("no image or caption")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(sample[ext]))
                image.load()
        except Exception as exc:  # noqa: BLE001 - an unusable sample gets no score (NaN) and is counted
            reason = "no image or caption" if isinstance(exc, ValueError) else "undecodable image"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        batch_images.append(transform(image))
        batch_texts.append(caption)
        batch_pos.append(len(uids) - 1)
        if len(batch_images) >= batch_size:
            flush()
    flush()
    return uids, scores, skipped


def score_dataset(checkpoint: str, dataset: str, out: str | None = None, batch_size: int = 256, device: str = "cpu",
                  model_config=None, bpe: str | None = None, reuse: bool = True) -> dict:
    """Score every sample of a build's shards (or a shard spec) and write ``uid, clip_score`` Parquet.

    Returns {"out", "n", "n_unscored", "model_fingerprint", "model_format", "checkpoint", "reused", "skipped",
    "mean", "quantiles"}.
    """
    import pyarrow as pa

    from clip_train.data import SkipCounter, raw_samples, resolve_shards
    from clip_train.interop import load_any

    out = out or default_output(dataset)
    shards = resolve_shards(shards_of(dataset))
    loaded = load_any(checkpoint, device, model_config=model_config, bpe=bpe)
    model_fp = loaded.fingerprint()
    fp = markers.fingerprint("clip_score", model_fp, markers.content_hashes(shards.urls))
    marker_uri = out + ".done.json"
    if reuse:
        done = markers.done(marker_uri, fp)
        if done is not None:
            return {**done, "reused": True}
    skips = SkipCounter()
    uids, scores, skipped = score_samples(loaded, raw_samples(iter(shards.urls), skips), batch_size, device)
    for reason, n in skips.counts.items():
        skipped[reason] = skipped.get(reason, 0) + n
    if not uids:
        raise EvalError(f"{dataset}: no samples to score")
    if len(set(uids)) != len(uids):
        raise EvalError(f"{dataset}: sample uids are not unique")
    metadata = {"clipline.model_fingerprint": model_fp, "clipline.model_format": loaded.format,
                "clipline.checkpoint": str(checkpoint), "clipline.score": "cosine(image, caption)"}
    table = pa.table({"uid": pa.array(uids, pa.string()), SCORE_COLUMN: pa.array(scores, pa.float32())})
    table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    storage.write_table(out, table)
    valid = np.array([s for s in scores if not math.isnan(s)])
    result = {"out": out, "n": len(uids), "n_unscored": int(len(uids) - len(valid)), "model_fingerprint": model_fp,
              "model_format": loaded.format, "checkpoint": str(checkpoint), "skipped": skipped,
              "mean": float(valid.mean()) if len(valid) else None,
              "quantiles": {f"{q:g}": float(np.quantile(valid, q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)} if len(valid) else {}}
    markers.write(marker_uri, fp, [out], result)
    return {**result, "reused": False}


def read_scores(uri: str) -> tuple[list[str], list[float], dict]:
    """(uids, scores, metadata) of a scores Parquet written by :func:`score_dataset`."""
    table = storage.read_table(uri)
    if not {"uid", SCORE_COLUMN} <= set(table.column_names):
        raise EvalError(f"{uri}: expected columns uid and {SCORE_COLUMN}, found {table.column_names}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"clipline.")}
    scores = [float("nan") if s is None else float(s) for s in table.column(SCORE_COLUMN).to_pylist()]
    return [str(u) for u in table.column("uid").to_pylist()], scores, meta
