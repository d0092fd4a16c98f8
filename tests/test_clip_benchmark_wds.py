"""CLIP_benchmark's webdataset evaluation layout: written by clip_train.benchmark_wds, read back by `clipline eval`'s
`wds:ROOT` spec with its class names and templates ({c} placeholders), and laid out as CLIP_benchmark expects."""

from __future__ import annotations

import tarfile

import numpy as np

from clip_train.benchmark_wds import is_benchmark_layout, load_benchmark_wds, write_benchmark_wds
from clip_train.evaluate import _eval_set
from clip_train.shards import jpeg_bytes, shape_image


def test_write_then_read_benchmark_layout(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["circle", "square", "triangle"]
    samples = [(f"s{i:04d}", jpeg_bytes(shape_image("red", classes[i % 3], rng, 32)), "jpg", i % 3) for i in range(25)]
    root = tmp_path / "shapes"
    n = write_benchmark_wds(str(root), classes, ["a photo of a {}.", "a {c} shape."], samples, samples_per_shard=10)
    assert n == 3
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"
    assert (root / "classnames.txt").read_text().splitlines() == classes
    assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}.", "a {c} shape."]
    with tarfile.open(root / "test" / "0.tar") as tar:
        assert tar.getnames()[:2] == ["s0000.jpg", "s0000.cls"]
    assert is_benchmark_layout(str(root)) and not is_benchmark_layout(str(root / "test"))
    es = _eval_set(f"wds:{root}")
    assert es.class_names == classes and es.templates == ["a photo of a {}.", "a {} shape."]
    assert es.ids == [s[0] for s in samples] and es.labels == [s[3] for s in samples]
    assert es.image(4).size == (32, 32)
    # an explicit split, and an unknown one
    same = load_benchmark_wds(f"{root}:test")
    assert same.ids == es.ids
    assert not is_benchmark_layout(f"{root}:train")
