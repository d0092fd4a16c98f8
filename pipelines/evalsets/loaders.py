"""Loaders that turn each kind of evaluation-set source (CIFAR pickles, digits, folders, shards) into an EvalSet."""
from __future__ import annotations

import glob
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.evalsets import templates as T
from pipelines.evalsets.base import EvalSet, EvalSetSpecError, check_labels, decode_image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _unpickle(path: Path) -> dict:
    """Read a CIFAR python batch; keys come back as str whether the file was written by Python 2 or 3."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise EvalSetSpecError(f"{path}: missing CIFAR batch file") from None
    except Exception as exc:
        raise EvalSetSpecError(f"{path}: not a CIFAR python-pickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise EvalSetSpecError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _names(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_pixels(d: dict, path: Path) -> np.ndarray:
    data = np.asarray(d.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise EvalSetSpecError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072) uint8")
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue values of a 32x32 image.
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _array_set(name, class_names, templates, pixels: np.ndarray, labels, spec) -> EvalSet:
    pixels = np.ascontiguousarray(pixels)
    labels = [int(x) for x in labels]
    check_labels(labels, len(class_names), where=name)
    return EvalSet(
        name=name,
        class_names=class_names,
        templates=list(templates),
        ids=[str(i) for i in range(len(labels))],
        labels=labels,
        load_image=lambda i: Image.fromarray(pixels[i], "RGB"),
        spec=spec,
    )


def load_cifar10(path: str, split: str = "test", spec: str = "") -> EvalSet:
    root = Path(path)
    if not (root / "batches.meta").exists() and (root / "cifar-10-batches-py" / "batches.meta").exists():
        root = root / "cifar-10-batches-py"
    if not (root / "batches.meta").exists():
        raise EvalSetSpecError(f"{path}: no CIFAR-10 python layout (expected batches.meta, test_batch, data_batch_1..5 "
                               f"here or under cifar-10-batches-py/)")
    meta = _unpickle(root / "batches.meta")
    class_names = _names(meta.get("label_names", T.CIFAR10_CLASSES))
    files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    pixels, labels = [], []
    for fname in files:
        d = _unpickle(root / fname)
        pixels.append(_cifar_pixels(d, root / fname))
        labels.extend(d.get("labels") or [])
        if len(labels) != sum(len(p) for p in pixels):
            raise EvalSetSpecError(f"{root / fname}: number of 'labels' differs from number of images")
    name = "cifar10" if split == "test" else "cifar10-train"
    return _array_set(name, class_names, T.CIFAR10_TEMPLATES, np.concatenate(pixels), labels, spec)


def load_cifar100(path: str, split: str = "test", spec: str = "") -> EvalSet:
    root = Path(path)
    if not (root / "meta").exists() and (root / "cifar-100-python" / "meta").exists():
        root = root / "cifar-100-python"
    if not (root / "meta").exists():
        raise EvalSetSpecError(f"{path}: no CIFAR-100 python layout (expected meta, train, test here or under "
                               f"cifar-100-python/)")
    meta = _unpickle(root / "meta")
    if "fine_label_names" not in meta:
        raise EvalSetSpecError(f"{root / 'meta'}: missing 'fine_label_names'")
    # CLIP's prompts use the names with underscores as spaces ("aquarium fish", "maple tree").
    class_names = [n.replace("_", " ") for n in _names(meta["fine_label_names"])]
    d = _unpickle(root / split)
    if "fine_labels" not in d:
        raise EvalSetSpecError(f"{root / split}: missing 'fine_labels'")
    pixels = _cifar_pixels(d, root / split)
    if len(d["fine_labels"]) != len(pixels):
        raise EvalSetSpecError(f"{root / split}: number of 'fine_labels' differs from number of images")
    name = "cifar100" if split == "test" else "cifar100-train"
    return _array_set(name, class_names, T.CIFAR100_TEMPLATES, pixels, d["fine_labels"], spec)


def load_digits(spec: str = "digits", size: int = 32) -> EvalSet:
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16 levels), upscaled to ``size`` px RGB."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    grey = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    pixels = np.stack(
        [np.asarray(Image.fromarray(g, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB"))
         for g in grey]
    )
    class_names = [str(i) for i in range(10)]
    return _array_set("digits", class_names, T.DIGITS_TEMPLATES, pixels, bunch.target, spec)


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _file_set(name, class_names, templates, entries, errors, spec) -> EvalSet:
    """``entries``: (id, path, label) of files that decoded; images are re-read from disk when iterated."""
    paths = [p for _, p, _ in entries]
    return EvalSet(
        name=name,
        class_names=class_names,
        templates=list(templates),
        ids=[i for i, _, _ in entries],
        labels=[lab for _, _, lab in entries],
        load_image=lambda i: decode_image(paths[i].read_bytes(), where=str(paths[i])),
        errors=errors,
        spec=spec,
    )


def _checked(path: Path, errors: list[str]) -> bool:
    try:
        decode_image(path.read_bytes(), where=str(path))
        return True
    except (ValueError, OSError) as exc:
        errors.append(f"skipped {exc}")
        return False


def load_folder(path: str, spec: str = "") -> EvalSet:
    """One sub-folder per class (sorted by name = label order); every image file below it; id = relative path."""
    root = Path(path)
    if not root.is_dir():
        raise EvalSetSpecError(f"{path}: not a directory (folder:PATH expects one sub-folder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise EvalSetSpecError(f"{path}: no class sub-folders (folder:PATH expects one sub-folder per class)")
    entries, errors = [], []
    for label, cdir in enumerate(class_dirs):
        for f in _image_files(cdir):
            if _checked(f, errors):
                entries.append((f.relative_to(root).as_posix(), f, label))
    class_names = [d.name.replace("_", " ") for d in class_dirs]
    return _file_set(root.name or "folder", class_names, T.GENERIC_TEMPLATES, entries, errors, spec)


def load_synth(path: str, spec: str = "") -> EvalSet:
    """The synthetic web's held-out split: PATH/heldout/<class_name>/<id>.jpg (+ heldout/classes.json)."""
    root = Path(path)
    held = root / "heldout" if (root / "heldout").is_dir() else root
    if not held.is_dir():
        raise EvalSetSpecError(f"{path}: no heldout/ directory (synth:PATH expects PATH/heldout/<class>/<id>.jpg)")
    class_dirs = {p.name: p for p in held.iterdir() if p.is_dir()}
    templates = list(T.GENERIC_TEMPLATES)
    meta_path = held / "classes.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            class_names = [str(c) for c in meta["class_names"]]
            templates = [str(t) for t in meta.get("templates") or templates]
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalSetSpecError(f"{meta_path}: expected {{\"class_names\": [...], \"templates\": [...]}} ({exc})") from None
    else:
        class_names = sorted(class_dirs)
    if not class_names:
        raise EvalSetSpecError(f"{held}: no classes (no classes.json and no class sub-folders)")
    errors: list[str] = []
    by_dir = {}
    for dname, d in sorted(class_dirs.items()):
        # A folder may spell the class with underscores where classes.json has spaces.
        for label, cname in enumerate(class_names):
            if dname in (cname, cname.replace(" ", "_"), cname.replace("/", "_")):
                by_dir[label] = d
                break
        else:
            errors.append(f"skipped {d}: folder names no class in {meta_path.name if meta_path.exists() else 'folders'}")
    entries, seen = [], set()
    for label in sorted(by_dir):
        for f in _image_files(by_dir[label]):
            ex_id = f.stem
            if ex_id in seen:
                errors.append(f"skipped {f}: duplicate id {ex_id!r}")
                continue
            if _checked(f, errors):
                seen.add(ex_id)
                entries.append((ex_id, f, label))
    return _file_set("synth", class_names, templates, entries, errors, spec)


def _wds_key(member_name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the basename."""
    dirname, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def _read_classnames(directory: Path) -> list[str] | None:
    txt, js = directory / "classnames.txt", directory / "classnames.json"
    if txt.exists():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    if js.exists():
        data = json.loads(js.read_text())
        if isinstance(data, dict):
            data = data.get("class_names") or data.get("classnames")
        if isinstance(data, list):
            return [str(c) for c in data]
        raise EvalSetSpecError(f"{js}: expected a list of class names or {{\"class_names\": [...]}}")
    return None


def _wds_label(files: dict[str, bytes]) -> int | None:
    if "cls" in files:
        return int(files["cls"].decode().strip())
    if "json" in files:
        label = json.loads(files["json"]).get("label")
        return None if label is None else int(label)
    return None


def iter_tar_samples(tar_path: str, errors: list[str]):
    """Yield (key, {ext: bytes}) per sample of one webdataset tar, in member order; a broken tar is reported."""
    try:
        with tarfile.open(tar_path, "r") as tf:
            current, files = None, {}
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _wds_key(m.name)
                if key != current and current is not None:
                    yield current, files
                    files = {}
                current = key
                fobj = tf.extractfile(m)
                files[ext] = fobj.read() if fobj is not None else b""
            if current is not None:
                yield current, files
    except (tarfile.TarError, OSError, EOFError) as exc:
        errors.append(f"{tar_path}: unreadable tar ({type(exc).__name__}: {exc}); samples after the damage skipped")


def load_wds(pattern: str, spec: str = "") -> EvalSet:
    """webdataset tars: {key}.jpg|png|webp + {key}.cls (int) or {key}.json with "label"; id = sample key."""
    tars = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    tars = [t for t in tars if os.path.isfile(t)]
    if not tars:
        raise EvalSetSpecError(f"{pattern}: no webdataset .tar files match (wds:GLOB expects e.g. wds:/data/*.tar)")
    class_names = _read_classnames(Path(tars[0]).parent)
    errors: list[str] = []
    ids, labels, blobs = [], [], []
    seen = set()
    for tar in tars:
        for key, files in iter_tar_samples(tar, errors):
            where = f"{tar}:{key}"
            ext = next((e for e in WDS_IMAGE_EXTS if e in files), None)
            if ext is None:
                errors.append(f"skipped {where}: no image ({'/'.join(WDS_IMAGE_EXTS)}) in sample")
                continue
            try:
                label = _wds_label(files)
            except (ValueError, AttributeError) as exc:
                errors.append(f"skipped {where}: unreadable label ({exc})")
                continue
            if label is None:
                errors.append(f"skipped {where}: no label (.cls or .json with \"label\")")
                continue
            if key in seen:
                errors.append(f"skipped {where}: duplicate key {key!r}")
                continue
            try:
                decode_image(files[ext], where=f"{where}.{ext}")
            except ValueError as exc:
                errors.append(f"skipped {exc}")
                continue
            seen.add(key)
            ids.append(key)
            labels.append(label)
            blobs.append(files[ext])
    if class_names is None:
        class_names = [str(i) for i in range(max(labels) + 1)] if labels else []
    check_labels(labels, len(class_names), where=pattern)
    name = Path(tars[0]).parent.name or "wds"
    return EvalSet(
        name=name,
        class_names=class_names,
        templates=list(T.GENERIC_TEMPLATES),
        ids=ids,
        labels=labels,
        load_image=lambda i: decode_image(blobs[i], where=f"{name}:{ids[i]}"),
        errors=errors,
        spec=spec,
    )
