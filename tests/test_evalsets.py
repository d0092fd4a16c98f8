"""Evaluation-set registry: every loader, spec parsing and bad inputs."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.evalsets import EvalSet, EvalSetSpecError, load_eval_set, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT / ".." / "shared" / "data"))


def _jpeg(rgb, q=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_digits_is_rgb_with_digit_templates():
    es = load_eval_set("digits")
    assert isinstance(es, EvalSet) and es.name == "digits"
    assert len(es) == 1797 and es.class_names == [str(i) for i in range(10)]
    assert es.templates == ['a photo of the number: "{}".']
    ex = next(iter(es))
    assert ex.id == "0" and ex.label == 0 and ex.image.mode == "RGB"
    assert np.asarray(ex.image).max() > 200  # upscaled from 0..16 grey levels


def test_spec_parsing_and_unknown_spec():
    assert parse_spec("cifar10:/a/b") == ("cifar10", "/a/b", "test")
    assert parse_spec("cifar10:/a/b:train") == ("cifar10", "/a/b", "train")
    assert parse_spec("cifar100:/a:b:test") == ("cifar100", "/a:b", "test")
    assert parse_spec("wds:/x/*.tar") == ("wds", "/x/*.tar", "test")
    for bad in ["imagenet:/x", "cifar10", "", "nonsense", "cifar10:"]:
        with pytest.raises(EvalSetSpecError) as err:
            load_eval_set(bad)
        msg = str(err.value)
        assert "\n" not in msg
        if bad not in ("cifar10:",):
            assert "digits" in msg and "folder:PATH" in msg and "wds:GLOB" in msg


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(EvalSetSpecError, match="batches.meta"):
        load_eval_set(f"cifar10:{tmp_path}")
    with pytest.raises(EvalSetSpecError, match="no webdataset"):
        load_eval_set(f"wds:{tmp_path}/*.tar")
    with pytest.raises(EvalSetSpecError, match="not a directory"):
        load_eval_set(f"folder:{tmp_path}/absent")
    (tmp_path / "meta").write_bytes(b"not a pickle")
    with pytest.raises(EvalSetSpecError, match="meta"):
        load_eval_set(f"cifar100:{tmp_path}")


def _fake_cifar100(root: Path, n_train=6, n_test=4) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(100)]
    names[1] = "aquarium_fish"
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"x"] * 20}, f)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(d / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f)


def test_cifar100_pickle_layout(tmp_path):
    _fake_cifar100(tmp_path)
    es = load_eval_set(f"cifar100:{tmp_path}")  # parent of the extracted dir
    assert es.name == "cifar100" and len(es) == 4 and len(es.class_names) == 100
    assert es.class_names[1] == "aquarium fish" and len(es.templates) == 18
    tr = load_eval_set(f"cifar100:{tmp_path / 'cifar-100-python'}:train")
    assert tr.name == "cifar100-train" and len(tr) == 6
    ex = list(tr)
    assert [e.id for e in ex] == [str(i) for i in range(6)] and [e.label for e in ex] == list(range(6))
    # channel-major rows: red plane first
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][2]
    px = np.asarray(ex[2].image)
    assert px.shape == (32, 32, 3)
    assert np.array_equal(px[..., 0].ravel(), raw[:1024]) and np.array_equal(px[..., 2].ravel(), raw[2048:])


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    conv = shared_data() / "cifar10" / "to_python_format.py"
    if not conv.exists():
        pytest.skip("shared data (CIFAR-10) not present")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(conv), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.shared_data
def test_cifar10_real_copy(cifar10_dir):
    import pyarrow.parquet as pq

    test = load_eval_set(f"cifar10:{cifar10_dir}")
    assert test.name == "cifar10" and len(test) == 10_000 and len(test.templates) == 18
    assert test.class_names[:3] == ["airplane", "automobile", "bird"]
    train = load_eval_set(f"cifar10:{cifar10_dir / 'cifar-10-batches-py'}:train")
    assert len(train) == 50_000
    # ids are indices in the original order: compare with the parquet's own index/label columns
    tbl = pq.read_table(shared_data() / "cifar10" / "cifar10-jpeg.parquet", columns=["split", "index", "label"])
    rows = [(i, lab) for s, i, lab in zip(*(tbl.column(c).to_pylist() for c in ("split", "index", "label")))
            if s == "train"]
    want = dict(rows)
    for i in (0, 12345, 49_999):
        assert train.labels[i] == want[i] and train.ids[i] == str(i)


def _img(color, size=(24, 20)):
    return Image.new("RGB", size, color)


def test_folder_with_corrupt_file(tmp_path):
    (tmp_path / "dog" / "sub").mkdir(parents=True)
    (tmp_path / "cat").mkdir()
    _img((200, 10, 10)).save(tmp_path / "cat" / "a.png")
    _img((10, 200, 10)).save(tmp_path / "dog" / "b.jpg")
    _img((10, 10, 200)).convert("L").save(tmp_path / "dog" / "sub" / "c.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(_jpeg(np.zeros((8, 8, 3)))[:40])
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    es = load_eval_set(f"folder:{tmp_path}")
    assert es.class_names == ["cat", "dog"]
    assert es.ids == ["cat/a.png", "dog/b.jpg", "dog/sub/c.png"] and es.labels == [0, 1, 1]
    assert all(ex.image.mode == "RGB" for ex in es)
    assert len(es.errors) == 1 and "broken.jpg" in es.errors[0]


def test_wds_with_cls_json_classnames_and_corrupt_member(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        _add(tf, "k0.jpg", _jpeg(np.full((16, 16, 3), 30)))
        _add(tf, "k0.cls", b"1\n")
        _add(tf, "k1.jpg", _jpeg(np.full((16, 16, 3), 90))[:30])  # truncated: reported, not fatal
        _add(tf, "k1.cls", b"0")
        _add(tf, "k2.png", (lambda b: (_img((1, 2, 3)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()))
        _add(tf, "k2.json", json.dumps({"label": 2}).encode())
        _add(tf, "k3.jpg", _jpeg(np.full((16, 16, 3), 10)))  # no label
    with tarfile.open(tmp_path / "00001.tar", "w") as tf:
        _add(tf, "k4.jpg", _jpeg(np.full((16, 16, 3), 200)))
        _add(tf, "k4.cls", b"0")
    (tmp_path / "classnames.txt").write_text("zero\none\ntwo\n")
    es = load_eval_set(f"wds:{tmp_path}/*.tar")
    assert es.ids == ["k0", "k2", "k4"] and es.labels == [1, 2, 0]
    assert es.class_names == ["zero", "one", "two"]
    assert len(es.errors) == 2
    assert any("k1" in e and "readable image" in e for e in es.errors) and any("k3" in e for e in es.errors)
    assert [ex.image.size for ex in es] == [(16, 16), (24, 20), (16, 16)]


def test_wds_truncated_tar_is_reported(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for i in range(3):
            _add(tf, f"s{i}.jpg", _jpeg(np.random.default_rng(i).integers(0, 255, (64, 64, 3))))
            _add(tf, f"s{i}.cls", b"0")
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    es = load_eval_set(f"wds:{tmp_path}/a.tar")
    assert len(es) >= 1 and any("a.tar" in e for e in es.errors)


def test_synth_heldout_split(tmp_path):
    held = tmp_path / "heldout"
    for cname in ("red ball", "blue cube"):
        (held / cname.replace(" ", "_")).mkdir(parents=True)
    _img((220, 0, 0)).save(held / "red_ball" / "u1.jpg")
    _img((0, 0, 220)).save(held / "blue_cube" / "u2.jpg")
    _img((0, 0, 200)).save(held / "blue_cube" / "u3.jpg")
    (held / "classes.json").write_text(json.dumps({"class_names": ["blue cube", "red ball"],
                                                   "templates": ["a render of a {}."]}))
    es = load_eval_set(f"synth:{tmp_path}")
    assert es.class_names == ["blue cube", "red ball"] and es.templates == ["a render of a {}."]
    assert es.ids == ["u2", "u3", "u1"] and es.labels == [0, 0, 1]
    (held / "classes.json").unlink()
    es2 = load_eval_set(f"synth:{tmp_path}")
    assert es2.class_names == ["blue_cube", "red_ball"] and len(es2) == 3
