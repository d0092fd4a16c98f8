"""Read any dataset an audit may be pointed at as (key, encoded image bytes or PIL image) items.

Forms: a shard directory or tar glob (webdataset / img2dataset shards), Parquet with an image-bytes column,
``folder:PATH`` (every image file below PATH; key = relative path), and any evaluation-set spec
(``cifar10:PATH:train``, ``digits``, ...; key = example id).
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.core.errors import ClipError
from pipelines.evalsets import EvalSetSpecError, load_eval_set
from pipelines.evalsets.loaders import IMAGE_EXTS, WDS_IMAGE_EXTS, iter_tar_samples

DATASET_FORMS = ("a shard directory or tar glob, a .parquet file/glob with image bytes, folder:PATH, or an "
                 "evaluation-set spec (digits, cifar10:PATH[:train], cifar100:PATH[:train], wds:GLOB, synth:PATH)")
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
KEY_COLUMNS = ("key", "uid", "id", "__key__")


class DatasetError(ClipError, ValueError):
    """A dataset reference that cannot be read at all."""


def _expand(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else ([pattern] if os.path.exists(pattern) else [])


def _tars(paths: list[str], errors: list[str]) -> Iterator[tuple[str, bytes]]:
    for tar in paths:
        for key, files in iter_tar_samples(tar, errors):
            ext = next((e for e in WDS_IMAGE_EXTS if e in files), None)
            if ext is None:
                continue  # caption-only members etc. are not images to audit
            yield key, files[ext]


def _parquets(paths: list[str], errors: list[str]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            errors.append(f"{path}: unreadable parquet ({type(exc).__name__}: {exc})")
            continue
        names = pf.schema_arrow.names
        img_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if img_col is None:
            errors.append(f"{path}: no image-bytes column (expected one of {', '.join(IMAGE_COLUMNS)})")
            continue
        key_col = next((c for c in KEY_COLUMNS if c in names), None)
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[img_col] + ([key_col] if key_col else [])):
            imgs = batch.column(img_col).to_pylist()
            keys = batch.column(key_col).to_pylist() if key_col else [f"{Path(path).name}:{row + i}" for i in range(len(imgs))]
            for k, b in zip(keys, imgs):
                if b is None:
                    errors.append(f"{path}: row key {k}: null image")
                else:
                    yield str(k), b
            row += len(imgs)


def _folder(root: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        yield p.relative_to(root).as_posix(), p.read_bytes()


def iter_dataset(dataset: str, errors: list[str]) -> Iterator[tuple[str, object]]:
    """Yield (key, image bytes or PIL image); per-item problems are appended to ``errors``, an unusable reference
    raises :class:`DatasetError` (or EvalSetSpecError for a bad evaluation-set spec) before anything is yielded."""
    if dataset.startswith("folder:"):
        root = Path(dataset[len("folder:"):])
        if not root.is_dir():
            raise DatasetError(f"{root}: not a directory (folder:PATH reads every image file below PATH)")
        return _folder(root)
    kind = dataset.split(":", 1)[0]
    if dataset == "digits" or kind in ("cifar10", "cifar100", "wds", "synth"):
        es = load_eval_set(dataset)
        errors.extend(es.errors)
        return ((ex.id, ex.image) for ex in es)
    if os.path.isdir(dataset):
        tars = sorted(glob.glob(os.path.join(dataset, "*.tar")))
        if tars:
            return _tars(tars, errors)
        parquets = sorted(glob.glob(os.path.join(dataset, "*.parquet")))
        if parquets:
            return _parquets(parquets, errors)
        raise DatasetError(f"{dataset}: directory holds no .tar shards and no .parquet files; expected {DATASET_FORMS}")
    paths = _expand(dataset)
    if not paths:
        raise DatasetError(f"{dataset}: no such file, directory or glob match; expected {DATASET_FORMS}")
    if all(p.endswith(".tar") for p in paths):
        return _tars(paths, errors)
    if all(p.endswith(".parquet") for p in paths):
        return _parquets(paths, errors)
    raise DatasetError(f"{dataset}: matches files that are neither .tar shards nor .parquet; expected {DATASET_FORMS}")


__all__ = ["DATASET_FORMS", "DatasetError", "EvalSetSpecError", "iter_dataset"]
