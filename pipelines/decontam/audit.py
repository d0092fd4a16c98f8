"""Contamination audit: near-duplicates between any dataset and evaluation sets, report.json + self-contained HTML,
and (with a trained checkpoint) CLIP section 5 accuracy on All / Clean / Overlap.

CLI contract (``clipline audit``): ``--dataset D --eval-set SPEC [--eval-set SPEC ...] --out DIR
[--checkpoint RUN_DIR]``; writes DIR/report.json and DIR/report.html.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections import defaultdict

from PIL import Image

from pipelines.decontam.datasets import DatasetError, iter_dataset
from pipelines.decontam.detector import DetectorConfig, EvalIndex, decode_pool_image, match_batch
from pipelines.decontam.stats import overlap_statistics
from pipelines.evalsets import EvalSetSpecError, load_eval_set

THUMB = 96
MAX_PAIRS_SHOWN = 200  # per evaluation set in the HTML (report.json lists every pair)


def _thumb_b64(img: Image.Image) -> str:
    im = img.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    if max(im.size) < THUMB:  # CIFAR-sized images: enlarge so a reader can see them
        f = THUMB / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _small_rgb(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    img = Image.open(io.BytesIO(item))
    if img.format == "JPEG":
        img.draft("RGB", (THUMB, THUMB))
    return img.convert("RGB")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _match_dataset(dataset, index, cfg, errors, want_thumbs):
    """All matches of the dataset against the index, plus colour thumbnails of matched dataset images."""
    matches, thumbs, n_items = [], {}, 0
    keys, greys, originals = [], [], []

    def flush():
        found, _ = match_batch(index, keys, greys, cfg)
        matches.extend(found)
        hit = {m.pool_key for m in found}
        for k, o in zip(keys, originals):
            if k in hit and k not in thumbs and len(thumbs) < want_thumbs:
                thumbs[k] = _thumb_b64(_small_rgb(o))
        keys.clear(), greys.clear(), originals.clear()

    for key, item in iter_dataset(dataset, errors):
        try:
            grey = item.convert("L") if isinstance(item, Image.Image) else decode_pool_image(item)
        except Exception as exc:  # corrupt image inside a shard: reported, not fatal
            errors.append(f"{dataset}: {key}: not a readable image ({type(exc).__name__}: {exc})")
            continue
        n_items += 1
        keys.append(key)
        greys.append(grey)
        originals.append(item)
        if len(keys) >= cfg.batch_size:
            flush()
    if keys:
        flush()
    return matches, thumbs, n_items


def run_audit(dataset: str, eval_specs: list[str], out_dir: str, checkpoint: str | None = None,
              **thresholds) -> dict:
    """Audit ``dataset`` against ``eval_specs``; write out_dir/report.json and report.html; return the report.

    ``thresholds`` override :class:`DetectorConfig` / ``VerifyConfig`` fields by name (radius, min_ncc,
    min_gncc, min_std, min_grad, max_checks, verify). Raises DatasetError / EvalSetSpecError on unusable input.
    """
    if not eval_specs:
        raise EvalSetSpecError("no evaluation set given (use --eval-set SPEC at least once)")
    cfg = DetectorConfig().with_thresholds(**thresholds)
    eval_sets = [load_eval_set(s) for s in eval_specs]
    names = [es.name for es in eval_sets]
    if len(set(names)) != len(names):
        # two sets with one name (e.g. two folders called "val") would merge in the report
        for i, es in enumerate(eval_sets):
            if names.count(es.name) > 1:
                es.name = f"{es.name}#{i}"
    index = EvalIndex.from_eval_sets(eval_sets)
    errors: list[str] = [e for es in eval_sets for e in es.errors]
    matches, dthumbs, n_items = _match_dataset(dataset, index, cfg, errors, MAX_PAIRS_SHOWN * len(eval_sets))

    by_set = defaultdict(list)
    for m in sorted(matches, key=lambda m: (m.eval_set, m.eval_id, m.distance, m.pool_key)):
        by_set[m.eval_set].append(m)
    report = {"dataset": dataset, "n_dataset": n_items, "eval_sets": {}, "errors": errors,
              "detector": cfg.to_dict()}
    for es in eval_sets:
        pairs = by_set.get(es.name, [])
        ov = sorted({m.eval_id for m in pairs})
        report["eval_sets"][es.name] = {
            "spec": es.spec,
            "n_eval": len(es),
            "n_overlap": len(ov),
            "overlap_rate": (len(ov) / len(es)) if len(es) else 0.0,
            "pairs": [{"eval_id": m.eval_id, "dataset_key": m.pool_key, "distance": int(m.distance),
                       "variant": m.variant, "ncc": m.ncc, "gncc": m.gncc} for m in pairs],
        }
    if checkpoint:
        from clip_train.evaluate import zeroshot_predictions  # torch stays out unless a checkpoint is audited

        report["statistics"] = {}
        for es in eval_sets:
            preds = zeroshot_predictions(checkpoint, es)
            ids = [str(i) for i, _, _ in preds]
            correct = [int(p) == int(lab) for _, p, lab in preds]
            overlap = {p["eval_id"] for p in report["eval_sets"][es.name]["pairs"]}
            report["statistics"][es.name] = overlap_statistics(ids, correct, overlap)
        report["checkpoint"] = checkpoint
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, sort_keys=True))
    _write_atomic(os.path.join(out_dir, "report.html"), render_html(report, eval_sets, dthumbs))
    return report


def _fmt(x, pct=True):
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.3g}"


def render_html(report: dict, eval_sets, dataset_thumbs: dict[str, str]) -> str:
    """Self-contained HTML (thumbnails embedded as base64 PNG): per-set summary, statistics, matched pairs."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Contamination audit</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}.pair{display:inline-block;margin:6px;padding:4px;border:1px solid #ddd;"
        "font-size:11px;text-align:center}.pair img{margin:2px;image-rendering:pixelated}",
        "</style></head><body>",
        f"<h1>Contamination audit</h1><p>Dataset: <code>{esc(report['dataset'])}</code> "
        f"({report['n_dataset']} images read)</p>",
        "<table><tr><th>evaluation set</th><th>n_eval</th><th>n_overlap</th><th>overlap rate</th></tr>",
    ]
    for name, r in report["eval_sets"].items():
        parts.append(f"<tr><td>{esc(name)}</td><td>{r['n_eval']}</td><td>{r['n_overlap']}</td>"
                     f"<td>{_fmt(r['overlap_rate'])}</td></tr>")
    parts.append("</table>")
    if "statistics" in report:
        parts.append("<h2>Zero-shot accuracy (CLIP section 5)</h2><table><tr><th>set</th><th>All</th><th>Clean</th>"
                     "<th>Overlap</th><th>All - Clean</th><th>p (one-sided binomial)</th>"
                     "<th>Overlap 99.5% CI</th></tr>")
        for name, s in report["statistics"].items():
            ci = s["overlap"]["ci"]
            parts.append(
                f"<tr><td>{esc(name)}</td><td>{_fmt(s['all']['accuracy'])}</td><td>{_fmt(s['clean']['accuracy'])}</td>"
                f"<td>{_fmt(s['overlap']['accuracy'])} (n={s['overlap']['n']})</td><td>{_fmt(s['all_minus_clean'])}</td>"
                f"<td>{_fmt(s['p_value'], pct=False)}</td>"
                f"<td>{'n/a' if ci is None else f'{100 * ci[0]:.1f}% - {100 * ci[1]:.1f}%'}</td></tr>")
        parts.append("</table>")
    by_name = {es.name: es for es in eval_sets}
    for name, r in report["eval_sets"].items():
        es = by_name[name]
        row_of = {ex_id: i for i, ex_id in enumerate(es.ids)}
        shown = r["pairs"][:MAX_PAIRS_SHOWN]
        parts.append(f"<h2>{esc(name)}: matched pairs ({len(r['pairs'])}"
                     f"{'' if len(shown) == len(r['pairs']) else f', first {len(shown)} shown'})</h2>")
        if not shown:
            parts.append("<p>No near-duplicates found.</p>")
        for p in shown:
            ev = _thumb_b64(es.image(row_of[p["eval_id"]]))
            dt = dataset_thumbs.get(p["dataset_key"])
            dimg = f"<img src='data:image/png;base64,{dt}'>" if dt else "<i>(not kept)</i>"
            parts.append(
                f"<div class='pair'><img src='data:image/png;base64,{ev}'>{dimg}<br>eval {esc(p['eval_id'])} | "
                f"{esc(p['dataset_key'])}<br>d={p['distance']} {esc(p['variant'])} gncc={p['gncc']:.2f}</div>")
    if report.get("errors"):
        parts.append(f"<h2>Problems ({len(report['errors'])})</h2><ul>")
        parts.extend(f"<li>{esc(e)}</li>" for e in report["errors"][:500])
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipline audit", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--eval-set", action="append", required=True, dest="eval_sets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--radius", type=int)
    ap.add_argument("--min-ncc", type=float)
    ap.add_argument("--min-gncc", type=float)
    a = ap.parse_args(argv)
    try:
        report = run_audit(a.dataset, a.eval_sets, a.out, a.checkpoint, radius=a.radius, min_ncc=a.min_ncc,
                           min_gncc=a.min_gncc)
    except (DatasetError, EvalSetSpecError) as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    for name, r in report["eval_sets"].items():
        print(f"{name}: {r['n_overlap']} / {r['n_eval']} evaluation examples overlap ({100 * r['overlap_rate']:.2f}%)")
    if report["errors"]:
        print(f"{len(report['errors'])} problems (see report.json 'errors')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
