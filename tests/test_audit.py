"""Contamination audit: statistics against scipy, webdataset and folder inputs, bad inputs, the report contract."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from pipelines.core.errors import ClipError
from pipelines.decontam import augment
from pipelines.decontam.audit import AuditError, main, run_audit
from pipelines.decontam.datasets import DatasetError
from pipelines.decontam.stats import clopper_pearson, overlap_statistics
from pipelines.evalsets import EvalSetSpecError

sys.path.insert(0, str(Path(__file__).parent))
from test_decontam import jpeg_bytes, scene  # noqa: E402


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 100), (812, 1000)]:
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.995, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert clopper_pearson(50, 100, 0.95) == pytest.approx((0.3983, 0.6017), abs=1e-4)  # textbook value


def test_overlap_statistics_known_numbers():
    # 100 examples; 20 overlap with 18 correct; 80 clean with 48 correct.
    ids = [str(i) for i in range(100)]
    correct = [i < 18 for i in range(20)] + [i < 48 for i in range(80)]
    s = overlap_statistics(ids, correct, {str(i) for i in range(20)} | {"not-an-eval-id"})
    assert (s["all"]["n"], s["clean"]["n"], s["overlap"]["n"]) == (100, 80, 20)
    assert s["all"]["accuracy"] == pytest.approx(0.66) and s["clean"]["accuracy"] == pytest.approx(0.60)
    assert s["overlap"]["accuracy"] == pytest.approx(0.90)
    assert s["all_minus_clean"] == pytest.approx(0.06)
    # one-sided: P(X >= 18 | n=20, p=0.6)
    assert s["p_value"] == pytest.approx(sps.binom.sf(17, 20, 0.6), rel=1e-9)
    assert s["p_value"] == pytest.approx(sps.binomtest(18, 20, 0.6, alternative="greater").pvalue)
    ci = sps.binomtest(18, 20).proportion_ci(0.995, "exact")
    assert s["overlap"]["ci"] == pytest.approx([ci.low, ci.high])
    empty = overlap_statistics(ids, correct, set())
    assert empty["overlap"]["n"] == 0 and empty["p_value"] is None and empty["all_minus_clean"] == 0.0


def _html_data(page: str) -> tuple[list[str], dict]:
    """The thumbnails and paged sections embedded in report.html."""
    thumbs = json.loads(page.split("const THUMBS=", 1)[1].split(";const SECTIONS=", 1)[0])
    sections = json.loads(page.split(";const SECTIONS=", 1)[1].split(";\nfunction show", 1)[0])
    return thumbs, sections


def _eval_folder(root: Path, n=12) -> dict:
    imgs = {}
    for i in range(n):
        cls = "even" if i % 2 == 0 else "odd"
        (root / cls).mkdir(parents=True, exist_ok=True)
        scene(i).save(root / cls / f"img{i}.png")
        imgs[f"{cls}/img{i}.png"] = scene(i)
    return imgs


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def test_audit_on_webdataset_shards(tmp_path):
    imgs = _eval_folder(tmp_path / "eval")
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        _add(tf, "000000000.jpg", jpeg_bytes(augment.apply("pad", imgs["even/img0.png"], rng)))
        _add(tf, "000000000.txt", b"a caption")
        _add(tf, "000000001.jpg", jpeg_bytes(scene(900)))
        _add(tf, "000000002.jpg", b"\xff\xd8\xff corrupt jpeg")
        _add(tf, "000000003.jpg", jpeg_bytes(augment.apply("mirror", imgs["odd/img3.png"], rng)))
    with tarfile.open(shards / "00001.tar", "w") as tf:
        _add(tf, "000001000.jpg", jpeg_bytes(augment.apply("jpeg", imgs["even/img0.png"], rng)))
        _add(tf, "000001001.jpg", jpeg_bytes(scene(901)))
    out = tmp_path / "out"
    report = run_audit(str(shards), [f"folder:{tmp_path / 'eval'}"], str(out))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    r = on_disk["eval_sets"]["eval"]
    assert r["n_eval"] == 12 and r["n_overlap"] == 2 and r["overlap_rate"] == pytest.approx(2 / 12)
    pairs = {(p["eval_id"], p["dataset_key"]) for p in r["pairs"]}
    assert pairs == {("even/img0.png", "000000000"), ("even/img0.png", "000001000"), ("odd/img3.png", "000000003")}
    assert all(isinstance(p["distance"], int) and p["variant"] for p in r["pairs"])
    assert all(p["found_by"] in ("hash", "descriptor", "both") and p["desc_cos"] is not None for p in r["pairs"])
    assert sum(r["found_by"].values()) == len(r["pairs"]) == sum(r["verified_by"].values())
    assert on_disk["n_dataset"] == 5
    assert any("000000002" in e for e in on_disk["errors"])  # corrupt member: reported, not fatal
    # nearest unflagged: each listed evaluation image is unflagged, most similar first, with a dataset key
    near = r["nearest_unflagged"]
    assert near and all(n["eval_id"] not in {"even/img0.png", "odd/img3.png"} for n in near)
    assert [n["desc_cos"] for n in near] == sorted((n["desc_cos"] for n in near), reverse=True)
    assert {n["dataset_key"] for n in near} <= {"000000000", "000000001", "000000003", "000001000", "000001001"}
    page = (out / "report.html").read_text()
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    thumbs, sections = _html_data(page)
    assert all(t.startswith("data:image/") for t in thumbs)
    pairs = sections["pairs0"]["rows"]
    assert len(pairs) == 3 and all(e >= 0 and d >= 0 for e, d, _ in pairs)  # every pair with both thumbnails
    assert len(sections["near0"]["rows"]) == len(near) and all(d >= 0 for _, d, _ in sections["near0"]["rows"])
    assert "found by <b>" in pairs[0][2] and "page " in page


def test_audit_on_image_folder_and_glob(tmp_path):
    imgs = _eval_folder(tmp_path / "eval")
    ds = tmp_path / "web" / "deep" / "er"
    ds.mkdir(parents=True)
    rng = np.random.default_rng(1)
    augment.apply("banner", imgs["odd/img5.png"], rng).save(ds / "copy.png")
    scene(777).save(tmp_path / "web" / "other.jpg")
    (tmp_path / "web" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    report = run_audit(f"folder:{tmp_path / 'web'}", [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"))
    r = report["eval_sets"]["eval"]
    assert [(p["eval_id"], p["dataset_key"]) for p in r["pairs"]] == [("odd/img5.png", "deep/er/copy.png")]
    assert report["n_dataset"] == 2 and any("broken.png" in e for e in report["errors"])


def test_audit_dataset_as_eval_spec_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = _eval_folder(tmp_path / "eval", n=6)
    table = pa.table({"uid": ["a", "b"], "jpg": [jpeg_bytes(imgs["even/img2.png"]), jpeg_bytes(scene(55))]})
    pq.write_table(table, tmp_path / "pool.parquet")
    r = run_audit(str(tmp_path / "pool.parquet"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o1"))
    assert [(p["eval_id"], p["dataset_key"]) for p in r["eval_sets"]["eval"]["pairs"]] == [("even/img2.png", "a")]
    # an evaluation-set spec as the dataset: the set against itself finds every example
    r2 = run_audit(f"folder:{tmp_path / 'eval'}", [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o2"))
    assert r2["eval_sets"]["eval"]["n_overlap"] == 6
    assert r2["eval_sets"]["eval"]["nearest_unflagged"] == []  # everything is flagged


def test_bad_inputs(tmp_path, capsys):
    _eval_folder(tmp_path / "eval", n=2)
    with pytest.raises(EvalSetSpecError, match="valid forms"):
        run_audit(str(tmp_path / "eval"), ["imagenet:/nowhere"], str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="no such file"):
        run_audit(str(tmp_path / "missing*.tar"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .tar shards"):
        run_audit(str(tmp_path / "empty"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    rep = run_audit(str(tmp_path / "junk.tar"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"))
    assert rep["n_dataset"] == 0 and any("junk.tar" in e for e in rep["errors"])
    assert main(["--dataset", str(tmp_path / "nope"), "--eval-set", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    # a checkpoint without predictions cannot give statistics: a user-facing error, not a silent skip
    with pytest.raises(AuditError, match="predictions"):
        run_audit(str(tmp_path / "eval"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"), "run-dir")
    assert issubclass(DatasetError, ClipError) and issubclass(EvalSetSpecError, ClipError)
    assert issubclass(AuditError, ClipError)
    with pytest.raises(ClipError, match="unknown detector thresholds"):
        run_audit(str(tmp_path / "eval"), [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"), min_gnc=0.3)


def test_statistics_from_predictions_passed_in(tmp_path):
    """The data plane takes zero-shot predictions in (flows.audit computes them from a checkpoint)."""
    imgs = _eval_folder(tmp_path / "eval", n=8)
    ids = sorted(imgs)
    table_dir = tmp_path / "web"
    table_dir.mkdir()
    for k in ids[:3]:  # three evaluation images are in the dataset
        imgs[k].save(table_dir / k.replace("/", "_"))
    scene(4242).save(table_dir / "other.png")
    # the model is right on the three overlapping images and on 1 of the 5 clean ones
    preds = {"eval": [(k, (0 if k.startswith("even") else 1) if (i < 3 or i == 5) else 7, 0 if k.startswith("even")
                       else 1) for i, k in enumerate(ids)]}
    rep = run_audit(f"folder:{table_dir}", [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o"), "run-dir",
                    predictions=preds)
    s = rep["statistics"]["eval"]
    assert rep["eval_sets"]["eval"]["n_overlap"] == 3 and rep["checkpoint"] == "run-dir"
    assert (s["overlap"]["n"], s["overlap"]["correct"], s["clean"]["n"], s["clean"]["correct"]) == (3, 3, 5, 1)
    called = []
    rep2 = run_audit(f"folder:{table_dir}", [f"folder:{tmp_path / 'eval'}"], str(tmp_path / "o2"),
                     predictions=lambda es: called.append(es.name) or preds["eval"])
    assert called == ["eval"] and rep2["statistics"] == rep["statistics"]
    assert "Zero-shot accuracy" in (tmp_path / "o" / "report.html").read_text()
    # the command line: flows.audit.main supplies predict(checkpoint, eval_set); here a stand-in
    seen = []
    assert main(["--dataset", f"folder:{table_dir}", "--eval-set", f"folder:{tmp_path / 'eval'}", "--out",
                 str(tmp_path / "o3"), "--checkpoint", "run-dir"],
                predict=lambda ck, es: seen.append(ck) or preds["eval"]) == 0
    assert seen == ["run-dir"]
    assert json.loads((tmp_path / "o3" / "report.json").read_text())["statistics"] == rep["statistics"]
    assert main(["--dataset", f"folder:{table_dir}", "--eval-set", f"folder:{tmp_path / 'eval'}", "--out",
                 str(tmp_path / "o4"), "--checkpoint", "run-dir"]) == 2  # no way to predict: one-line error


def test_audit_writes_to_s3(tmp_path, s3_bucket):
    from pipelines.core import storage

    imgs = _eval_folder(tmp_path / "eval", n=4)
    web = tmp_path / "web"
    web.mkdir()
    imgs["even/img2.png"].save(web / "copy.png")
    rep = run_audit(f"folder:{web}", [f"folder:{tmp_path / 'eval'}"], f"{s3_bucket}/audits/a1")
    back = json.loads(storage.read_bytes(f"{s3_bucket}/audits/a1/report.json"))
    assert back["eval_sets"]["eval"]["n_overlap"] == rep["eval_sets"]["eval"]["n_overlap"] == 1
    assert storage.read_bytes(f"{s3_bucket}/audits/a1/report.html").startswith(b"<!doctype html>")


def test_worker_processes_give_the_same_report(tmp_path):
    """Batches after the first go to worker processes (spawned, index loaded from a file); matches, pairs and the
    nearest unflagged items are those of the in-process scan."""
    imgs = _eval_folder(tmp_path / "eval", n=16)
    web = tmp_path / "web"
    web.mkdir()
    rng = np.random.default_rng(3)
    names = sorted(imgs)
    for i in range(40):  # copies of some evaluation images among unrelated scenes, several batches of 8
        img = augment.apply(["shift", "recrop", "jpeg", "banner"][i % 4], imgs[names[i % 16]], rng) if i % 3 == 0 \
            else scene(500 + i)
        img.save(web / f"item{i:02d}.png")
    reports = [run_audit(f"folder:{web}", [f"folder:{tmp_path / 'eval'}"], str(tmp_path / f"o{w}"),
                         detector={"batch_size": 8}, workers=w) for w in (1, 2)]
    one, two = (r["eval_sets"]["eval"] for r in reports)
    assert one["pairs"] and one["pairs"] == two["pairs"]
    assert one["nearest_unflagged"] == two["nearest_unflagged"] and one["n_overlap"] == two["n_overlap"]
    assert reports[0]["n_dataset"] == reports[1]["n_dataset"] == 40
