"""Run report (flows.report): every section, its plots and numbers from artifacts on disk; bad inputs become notes."""
from __future__ import annotations

import base64
import io
import json
import os
import re

import pytest
from PIL import Image

from flows.report import load_metrics, markdown_tables, render_report
from pipelines.decontam.stats import overlap_statistics
from schemas import manifest as manifest_schema

PNG_RE = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_json(path, doc) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)  # sorted, as the build writes its manifest


def _manifest() -> dict:
    rejected = {"curate:wrong_language": 211, "curate:no_match": 16, "crawl:HTTP Error 404: Not Found": 9,
                "crawl:HTTP Error 302: redirect loop.\nThe last 30x error | was: Found": 4,
                "decontam:eval_overlap:cifar10": 41, "balance:balance": 93}
    kept = 700 - sum(rejected.values())
    before = {str(e): c for e, c in enumerate([980, 420, 150, 77, 31, 8, 3, 1, 1])}
    after = {str(e): c for e, c in enumerate([120, 118, 97, 64, 31, 8, 3, 1, 0])}
    matched = {str(e): c for e, c in enumerate([2000, 900, 300, 120, 40, 9, 3, 1, 1, 5])}
    doc = {
        "schema": manifest_schema.NAME, "version": manifest_schema.VERSION,
        "lineage": {"inputs": [{"uri": "/data/raw.parquet", "sha256": "ab" * 32}],
                    "querylist": {"uri": "q", "sha256": "cd"}},
        "params": {"seed": 7}, "seed": 7,
        "tools": {t: "1" for t in manifest_schema.REQUIRED_TOOLS},
        "funnel": {"input_rows": 700, "kept": kept, "rejected": rejected, "stages": {
            "curate": {"in": 700, "out": 473}, "crawl_and_images": {"in": 473, "out": 460},
            "decontam": {"in": 460, "out": 419}, "balance": {"in": 419, "out": kept},
            "shard": {"in": kept, "out": kept}}},
        "curate": {"steps": [{"step": "read", "rows_in": 700, "rows_out": 700},
                             {"step": "match", "rows_in": 700, "rows_out": 684},
                             {"step": "language", "rows_in": 684, "rows_out": 473}],
                   "balance": {"t": 250.0, "entries_matched": 9}},
        "decontam": {"n_dropped": 41, "pool_ok": 460, "matches": 44, "matches_per_eval_set": {"cifar10": 44}},
        "balance": {"t": 125.0, "seed": 7, "target_size": None, "input_rows": 419, "kept": kept},
        "entry_counts": {"matched": matched, "before": before, "after": after},
        "shards": [{"name": "00000.tar", "n": 300, "tar_sha256": "0", "parquet_sha256": "1"},
                   {"name": "00001.tar", "n": kept - 300, "tar_sha256": "2", "parquet_sha256": "3"}],
        "samples_per_shard": 300,
    }
    return manifest_schema.validate(doc)  # the fake follows the real manifest contract


def _audit_report(with_thumbs: bool) -> dict:
    pairs = [{"eval_id": str(i), "dataset_key": f"00000/{i:04d}", "distance": i % 5, "variant": "trim~full",
              "ncc": 0.97, "gncc": 0.91} for i in (3, 17, 17, 42)]
    if with_thumbs:
        pairs[0]["eval_thumb"] = _png_b64((255, 0, 0))
        pairs[0]["dataset_thumb"] = _png_b64((0, 0, 255))
    ids = [str(i) for i in range(200)]
    correct = [i % 3 != 0 or i in (3, 17, 42) for i in range(200)]
    return {"dataset": "/b/shards", "n_dataset": 419, "errors": [], "eval_sets": {
        "cifar10": {"spec": "cifar10:/x", "n_eval": 200, "n_overlap": 3, "overlap_rate": 3 / 200, "pairs": pairs},
        "digits": {"spec": "digits", "n_eval": 1797, "n_overlap": 0, "overlap_rate": 0.0, "pairs": []}},
        "statistics": {"cifar10": overlap_statistics(ids, correct, {"3", "17", "42"})}}


def _metrics_lines(n: int = 30) -> list[str]:
    return [json.dumps({"step": s, "epoch": 0, "loss": 4.0 / s, "lr": 1e-3 * min(1.0, s / 10), "logit_scale": 14.3,
                        "samples_per_s": 500.0 + s, "data_wait_s": 0.01}) for s in range(1, n + 1)]


def _eval_doc(per_class: bool) -> dict:
    m = {"zeroshot_top1": 0.6125, "zeroshot_top5": 0.9375, "mean_per_class_recall": 0.6025,
         "linear_probe_top1": 0.7350, "n": 400}
    if per_class:
        m["per_class_recall"] = {c: (i + 1) / 11 for i, c in enumerate(CLASSES)}
    return {"checkpoint": "/runs/r1", "step": 30, "eval_sets": {"cifar10": m}}


@pytest.fixture()
def artifacts(tmp_path):
    d = {k: tmp_path / k for k in ("build", "audit", "run", "eval")}
    _write_json(str(d["build"] / "manifest.json"), _manifest())
    _write_json(str(d["audit"] / "report.json"), _audit_report(with_thumbs=True))
    (d["audit"] / "report.html").write_text("<html>audit</html>")
    d["run"].mkdir()
    (d["run"] / "metrics.jsonl").write_text("\n".join(_metrics_lines()) + "\n")
    _write_json(str(d["run"] / "config.json"), {"args": {"batch_size": 64, "model": "tiny-test-model"}})
    _write_json(str(d["eval"] / "eval.json"), _eval_doc(per_class=True))
    return d


def _render(tmp_path, d, name="report.html", **override) -> str:
    kw = {"build_dir": str(d["build"]), "audit_dir": str(d["audit"]), "run_dir": str(d["run"]),
          "eval_dir": str(d["eval"]), **override}
    out = render_report(str(tmp_path / "out" / name), title="test <run>", **kw)
    with open(out, encoding="utf-8") as f:
        return f.read()


def _pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in PNG_RE.findall(page)]


def test_full_report_has_every_section_plot_and_number(tmp_path, artifacts):
    page = _render(tmp_path, artifacts)
    assert "<title>test &lt;run&gt;</title>" in page  # escaped
    for sid in ("build", "contamination", "training", "evaluation"):
        assert f'<section id="{sid}">' in page
    assert 'class="note"' not in page  # every input was well formed

    # Build: funnel in the build's stage order (the manifest's keys are sorted), rejected reasons, curation, t, shards
    m = _manifest()
    body = page[page.index('<section id="build">'):page.index('<section id="contamination">')]
    pos = [body.index(f"<td>{s}</td>") for s in ("curate", "crawl_and_images", "decontam", "balance", "shard")]
    assert pos == sorted(pos)
    assert "700" in body and f"<b>{m['funnel']['kept']}</b>" in body
    assert "<td>wrong_language</td><td class=\"num\">211</td>" in body
    assert "redirect loop. The last 30x error | was: Found" in body  # one line, escaped, kept whole when short
    assert "<td>language</td><td class=\"num\">684</td><td class=\"num\">473</td><td class=\"num\">211</td>" in body
    assert "t = 125" in body
    assert "<td>00001.tar</td>" in body and f"<td class=\"num\">{m['shards'][1]['n']}</td>" in body
    # entries with a match before/after (a 0 count is not an entry with a match) and the largest counts
    assert ("<td>matched (before curation&#x27;s balancing)</td><td class=\"num\">10</td><td class=\"num\">3,379</td>"
            "<td class=\"num\">2,000</td>") in body
    assert ("<td>pool before the second pass</td><td class=\"num\">9</td><td class=\"num\">1,671</td>"
            "<td class=\"num\">980</td>") in body
    assert "<td>published</td><td class=\"num\">8</td><td class=\"num\">442</td><td class=\"num\">120</td>" in body
    # head (matched count >= t = 125): entries 0-2, 3,200 matched, 335 published; tail: 7 entries, 179 -> 107
    assert ("<td>head (count &gt;= t)</td><td class=\"num\">3</td><td class=\"num\">3,200</td>"
            "<td class=\"num\">335</td><td class=\"num\">10.5%</td>") in body
    assert ("<td>tail (count &lt; t)</td><td class=\"num\">7</td><td class=\"num\">179</td>"
            "<td class=\"num\">107</td><td class=\"num\">59.8%</td>") in body

    # Contamination: overlap table, statistics, link to the audit's HTML (relative), the pair's thumbnails
    body = page[page.index('<section id="contamination">'):page.index('<section id="training">')]
    assert "<td>cifar10</td><td class=\"num\">200</td><td class=\"num\">3</td><td class=\"num\">1.50%</td>" in body
    assert "<td>digits</td><td class=\"num\">1,797</td><td class=\"num\">0</td><td class=\"num\">0.00%</td>" in body
    assert 'href="../audit/report.html"' in body
    st = _audit_report(False)["statistics"]["cifar10"]
    assert f"{100 * st['clean']['accuracy']:.2f}%" in body and "<td>Overlap</td>" in body
    assert "<td>00000/0042</td>" in body
    thumbs = re.findall(r'<img class="thumb" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', body)
    assert [Image.open(io.BytesIO(base64.b64decode(t))).getpixel((0, 0)) for t in thumbs] == [(255, 0, 0), (0, 0, 255)]

    # Training: final numbers, config in a collapsed block
    body = page[page.index('<section id="training">'):page.index('<section id="evaluation">')]
    assert "<td>last step</td><td class=\"num\">30</td>" in body
    assert f"<td>final loss</td><td class=\"num\">{4.0 / 30:.4g}</td>" in body
    assert "<details><summary>config.json</summary>" in body and "tiny-test-model" in body

    # Evaluation: the table's numbers
    body = page[page.index('<section id="evaluation">'):]
    assert "61.25%" in body and "93.75%" in body and "60.25%" in body and "73.50%" in body and "400" in body

    # Plots: funnel, entry counts, loss, lr, per-class; two thumbnails. All decode as real PNG images.
    images = _pngs(page)
    plots = [im for im in images if im.size != (8, 8)]
    assert len(plots) == 5 and all(im.format == "PNG" and im.size[0] > 200 for im in plots)
    assert "zero-shot accuracy per class" in page and "entry counts sorted descending" in page


def test_report_is_deterministic_and_written_atomically(tmp_path, artifacts):
    a = _render(tmp_path, artifacts, "a.html")
    b = _render(tmp_path, artifacts, "b.html")
    assert a == b  # same inputs => same bytes (no timestamps, PNGs without metadata)
    assert not any("Software" in im.info for im in _pngs(a))  # bytes do not change with the matplotlib install
    assert sorted(os.listdir(tmp_path / "out")) == ["a.html", "b.html"]  # no temp file left behind


def test_malformed_metrics_line_gives_a_note_and_keeps_the_rest(tmp_path, artifacts):
    lines = _metrics_lines(10)
    lines.insert(4, '{"step": 5, "loss": ')  # a line cut short by a killed writer
    lines.insert(7, '["not", "an", "object"]')
    (artifacts["run"] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records, problems = load_metrics(str(artifacts["run"] / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 11)) and len(problems) == 2
    page = _render(tmp_path, artifacts)
    body = page[page.index('<section id="training">'):page.index('<section id="evaluation">')]
    assert "skipped 2 malformed line(s)" in body and "line 5: not JSON" in body and "metrics.jsonl" in body
    assert "<td>last step</td><td class=\"num\">10</td>" in body
    assert len(PNG_RE.findall(body)) == 2  # loss and lr curves still drawn


def test_unusable_inputs_become_one_line_notes(tmp_path, artifacts):
    (artifacts["run"] / "metrics.jsonl").write_text("this is not json\n{also not}\n")
    (artifacts["build"] / "manifest.json").write_text('{"schema": "manifest", ')
    (artifacts["audit"] / "report.json").unlink()
    _write_json(str(artifacts["eval"] / "eval.json"), {"eval_sets": ["cifar10"]})
    (artifacts["run"] / "config.json").write_text("[1, 2]")
    page = _render(tmp_path, artifacts)
    notes = re.findall(r'<p class="note">(.*?)</p>', page)
    assert len(notes) == 5, notes
    by_file = {n.split(": ", 1)[0]: n for n in notes}
    assert "not valid JSON" in by_file["Build"] and "manifest.json" in by_file["Build"]
    assert "report.json" in by_file["Contamination"] and "no such file" in by_file["Contamination"]
    assert "no usable metrics" in by_file["Training"] and "line 1: not JSON" in by_file["Training"]
    assert "config.json" in by_file["Training config"] and "expected a JSON object" in by_file["Training config"]
    assert "eval.json" in by_file["Evaluation"] and "eval_sets" in by_file["Evaluation"]
    assert "data:image/png" not in page


def test_sections_follow_their_inputs_and_per_class_chart_is_optional(tmp_path, artifacts):
    _write_json(str(artifacts["eval"] / "eval.json"), _eval_doc(per_class=False))
    page = _render(tmp_path, artifacts, build_dir=None, audit_dir=None, run_dir=None)
    assert '<section id="evaluation">' in page and '<section id="build">' not in page
    assert '<section id="training">' not in page and '<section id="contamination">' not in page
    assert "61.25%" in page and "data:image/png" not in page  # no per-class numbers, so no chart

    # Without thumbnails in report.json, the pairs table has no image columns; the link to the audit's HTML stays
    _write_json(str(artifacts["audit"] / "report.json"), _audit_report(with_thumbs=False))
    page = _render(tmp_path, artifacts, build_dir=None, run_dir=None, eval_dir=None)
    assert "evaluation image" not in page and 'href="../audit/report.html"' in page

    # Problems the audit met with its inputs are reported, not hidden
    doc = _audit_report(with_thumbs=False)
    doc["errors"] = ["folder:/ds: bad.jpg: not a readable image", "folder:/ds: b.png: truncated"]
    _write_json(str(artifacts["audit"] / "report.json"), doc)
    page = _render(tmp_path, artifacts, build_dir=None, run_dir=None, eval_dir=None)
    assert '<p class="warn">2 input problem(s)' in page and "bad.jpg: not a readable image" in page


def test_markdown_tables(tmp_path, artifacts):
    tables = markdown_tables(build_dir=str(artifacts["build"]), audit_dir=str(artifacts["audit"]),
                             eval_dir=str(artifacts["eval"]), run_dir=str(artifacts["run"]))
    assert set(tables) == {"funnel", "rejected", "curation", "contamination", "training", "evaluation"}
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in tables)  # valid Prefect artifact keys
    assert "| curate | 700 | 473 | 227 |" in tables["funnel"]
    assert "| decontam | eval_overlap:cifar10 | 41 |" in tables["rejected"]
    # a reason with a newline and a pipe stays one table row with the pipe escaped
    assert "| crawl | HTTP Error 302: redirect loop. The last 30x error \\| was: Found | 4 |" in tables["rejected"]
    assert "| cifar10 | 200 | 3 | 1.50% |" in tables["contamination"] and "| Clean |" in tables["contamination"]
    assert "| cifar10 | 400 | 61.25% | 93.75% | 60.25% | 73.50% |" in tables["evaluation"]
    assert "| last step | 30 |" in tables["training"]

    missing = markdown_tables(build_dir=str(tmp_path / "nowhere"), eval_dir=str(tmp_path / "nowhere"))
    assert set(missing) == {"funnel", "evaluation"}
    assert "manifest.json" in missing["funnel"] and "eval.json" in missing["evaluation"]


def test_long_reason_lists_are_cut_with_a_count_of_the_rest(tmp_path, artifacts):
    m = _manifest()
    extra = {f"crawl:IncompleteRead({1000 + i} bytes read)": 1 + i % 2 for i in range(45)}
    m["funnel"]["rejected"].update(extra)
    m["funnel"]["input_rows"] += sum(extra.values())
    _write_json(str(artifacts["build"] / "manifest.json"), manifest_schema.validate(m))
    page = _render(tmp_path, artifacts, audit_dir=None, run_dir=None, eval_dir=None)
    n_reasons = len(m["funnel"]["rejected"])
    table = page[page.index("<h3>Rejected rows"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") - 1 == 40  # header row + the 40 largest
    # the rows not shown: the smallest counts (ties by text), summed
    counts = sorted(m["funnel"]["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    rest = counts[40:]
    assert f"and {n_reasons - 40} more reasons with {sum(n for _, n in rest)} rows" in page
    tables = markdown_tables(build_dir=str(artifacts["build"]))
    assert tables["rejected"].count("\n| ") == 40 and f"and {n_reasons - 40} more reasons" in tables["rejected"]


def test_report_reads_and_writes_s3(s3_bucket, artifacts):
    """A build published to S3 (moto's server on 127.0.0.1) reports the same as a local one."""
    from pipelines.core import storage

    for part, name in (("build", "manifest.json"), ("eval", "eval.json")):
        storage.write_bytes_atomic(f"{s3_bucket}/{part}/{name}", (artifacts[part] / name).read_bytes())
    out = render_report(f"{s3_bucket}/reports/run.html", build_dir=f"{s3_bucket}/build", eval_dir=f"{s3_bucket}/eval",
                        audit_dir=f"{s3_bucket}/audit")
    page = storage.read_bytes(out).decode()
    assert out == f"{s3_bucket}/reports/run.html"
    assert '<section id="build">' in page and "<td>00001.tar</td>" in page and "61.25%" in page
    assert len(PNG_RE.findall(page)) == 3  # funnel, entry counts, per class
    notes = re.findall(r'<p class="note">(.*?)</p>', page)
    assert len(notes) == 1 and f"{s3_bucket}/audit/report.json" in notes[0]  # nothing was put there


# ------------------------------------------------------------------------------ bugs raise, bad inputs become notes


def test_a_bug_in_a_section_raises_instead_of_becoming_a_note(tmp_path, artifacts, monkeypatch):
    """Only a missing/malformed input (SectionError) may become a note; a bug in the report code must surface."""
    from flows.report import plots

    def broken_plot(labels, counts):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(plots, "funnel_plot", broken_plot)
    out = tmp_path / "out" / "bug.html"
    with pytest.raises(TypeError, match="unsupported operand") as info:
        render_report(str(out), build_dir=str(artifacts["build"]), eval_dir=str(artifacts["eval"]))
    assert any("Build section" in n and "manifest.json" in n for n in info.value.__notes__)  # where it happened
    assert not out.exists()  # no half-true report is written

    # the Markdown tables follow the same rule
    import flows.report.markdown as md

    def broken_rows(m):
        raise KeyError("in")

    monkeypatch.setattr(md, "funnel_rows", broken_rows)
    with pytest.raises(KeyError):
        markdown_tables(build_dir=str(artifacts["build"]))


def test_a_missing_input_file_becomes_a_note_and_the_rest_renders(tmp_path, artifacts):
    (artifacts["build"] / "manifest.json").unlink()
    page = _render(tmp_path, artifacts)
    notes = re.findall(r'<p class="note">(.*?)</p>', page)
    assert len(notes) == 1, notes
    assert notes[0].startswith("Build: ") and str(artifacts["build"] / "manifest.json") in notes[0]
    body = page[page.index('<section id="build">'):page.index('<section id="contamination">')]
    assert "data:image/png" not in body and "<table>" not in body
    assert "61.25%" in page and len(_pngs(page)) == 2 + 3  # 2 thumbnails; loss, lr, per-class; none from build

    tables = markdown_tables(build_dir=str(artifacts["build"]), eval_dir=str(artifacts["eval"]))
    assert set(tables) == {"funnel", "evaluation"}
    assert tables["funnel"].startswith("Not available: ") and "manifest.json" in tables["funnel"]


def test_a_section_error_raised_deep_in_a_section_is_a_note(tmp_path, artifacts, monkeypatch):
    """An input found malformed past the section's first checks (SectionError from anywhere inside) costs only that
    section."""
    from flows.report import SectionError, plots

    def unreadable(name, pc):
        raise SectionError(f"{artifacts['eval'] / 'eval.json'}: per-class recall of {name} is unusable")

    monkeypatch.setattr(plots, "per_class_plot", unreadable)
    page = _render(tmp_path, artifacts)
    notes = re.findall(r'<p class="note">(.*?)</p>', page)
    assert notes == [f"Evaluation: {artifacts['eval'] / 'eval.json'}: per-class recall of cifar10 is unusable"]
    assert '<section id="build">' in page and "<td>00001.tar</td>" in page
