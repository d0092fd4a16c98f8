"""Evaluation sets in CLIP_benchmark's webdataset layout (read and write), so the same files feed clipline's
evaluation and CLIP_benchmark's (``clip_benchmark eval --dataset wds/NAME --dataset_root ROOT``)::

    ROOT/classnames.txt                          one class name per line, in label order
    ROOT/zeroshot_classification_templates.txt   one prompt per line, the class written as {c}
    ROOT/SPLIT/nshards.txt                       the number of shards
    ROOT/SPLIT/0.tar ... ROOT/SPLIT/{n-1}.tar    {key}.webp|png|jpg|jpeg + {key}.cls (integer label)

``clipline eval --eval-set wds:ROOT`` (or ``wds:ROOT:SPLIT``) reads it; any other ``wds:`` spec goes to the
evaluation-set registry (tar globs with classnames beside them). Reads go through :mod:`pipelines.core.storage`.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Sequence

from pipelines.core import storage

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def split_spec(path: str) -> tuple[str, str]:
    """'ROOT' -> (ROOT, 'test'); 'ROOT:train' -> (ROOT, 'train')."""
    head, sep, tail = path.rpartition(":")
    if sep and tail and "/" not in tail and storage.exists(storage.join(head, CLASSNAMES)):
        return head, tail
    return path, "test"


def is_benchmark_layout(path: str) -> bool:
    root, split = split_spec(path)
    return (not any(c in root for c in "*?[{") and storage.exists(storage.join(root, CLASSNAMES))
            and storage.exists(storage.join(root, split, "nshards.txt")))


def _lines(uri: str) -> list[str]:
    return [line.strip() for line in storage.read_bytes(uri).decode("utf-8").splitlines() if line.strip()]


def load_benchmark_wds(path: str, spec: str = ""):
    """An EvalSet (pipelines.evalsets) of a CLIP_benchmark webdataset directory; images decoded lazily."""
    from pipelines.evalsets.base import EvalSet, EvalSetSpecError, check_labels, decode_image

    root, split = split_spec(path)
    classes = _lines(storage.join(root, CLASSNAMES))
    tpl_uri = storage.join(root, TEMPLATES)
    templates = [t.replace("{c}", "{}") for t in _lines(tpl_uri)] if storage.exists(tpl_uri) else ["a photo of a {}."]
    try:
        n = int(storage.read_bytes(storage.join(root, split, "nshards.txt")).decode().strip())
    except ValueError:
        raise EvalSetSpecError(f"{root}/{split}/nshards.txt: expected an integer") from None
    ids, labels, blobs, errors = [], [], [], []
    for i in range(n):
        uri = storage.join(root, split, f"{i}.tar")
        if not storage.exists(uri):
            raise EvalSetSpecError(f"{uri}: missing (nshards.txt says {n})")
        with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            current, files = None, {}
            for member in list(_members(tar)) + [(None, None, None)]:
                key, ext, data = member
                if key != current and current is not None:
                    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
                    if image_ext is None or "cls" not in files:
                        errors.append(f"skipped {uri}:{current}: needs an image and a .cls label")
                    else:
                        ids.append(current)
                        labels.append(int(files["cls"].decode().strip()))
                        blobs.append(files[image_ext])
                    files = {}
                current = key
                if key is not None:
                    files[ext] = data
    check_labels(labels, len(classes), where=root)
    name = storage.basename(root) or "wds"
    return EvalSet(name=name, class_names=classes, templates=templates, ids=ids, labels=labels,
                   load_image=lambda i: decode_image(blobs[i], where=f"{name}:{ids[i]}"), errors=errors, spec=spec)


def _members(tar: tarfile.TarFile):
    for m in tar:
        if not m.isfile():
            continue
        base = m.name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        key = m.name[: len(m.name) - len(base)] + stem
        f = tar.extractfile(m)
        yield key, ext.lower(), f.read() if f is not None else b""


def write_benchmark_wds(root: str, class_names: Sequence[str], templates: Sequence[str],
                        samples: Iterable[tuple[str, bytes, str, int]], split: str = "test",
                        samples_per_shard: int = 5000) -> int:
    """Write (key, image bytes, image extension, label) samples in CLIP_benchmark's layout; returns the shard count.

    ``templates`` use ``{}`` or ``{c}`` for the class name (written as ``{c}``, CLIP_benchmark's form).
    """
    storage.write_bytes_atomic(storage.join(root, CLASSNAMES), "\n".join(class_names).encode())
    storage.write_bytes_atomic(storage.join(root, TEMPLATES),
                               "\n".join(t.replace("{}", "{c}") for t in templates).encode())
    shard, count, n_shards = None, 0, 0

    def flush(buf: io.BytesIO, index: int) -> None:
        storage.write_bytes_atomic(storage.join(root, split, f"{index}.tar"), buf.getvalue())

    buf = None
    for key, data, ext, label in samples:
        if shard is None or count == samples_per_shard:
            if shard is not None:
                shard.close()
                flush(buf, n_shards - 1)
            buf = io.BytesIO()
            shard = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
            n_shards += 1
            count = 0
        for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(int(label)).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            shard.addfile(info, io.BytesIO(payload))
        count += 1
    if shard is not None:
        shard.close()
        flush(buf, n_shards - 1)
    storage.write_bytes_atomic(storage.join(root, split, "nshards.txt"), f"{n_shards}\n".encode())
    return n_shards
