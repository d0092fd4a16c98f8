"""Contamination audit: near-duplicates between any dataset and evaluation sets, report.json + self-contained HTML,
and (given zero-shot predictions) CLIP section 5 accuracy on All / Clean / Overlap.

Every matched pair is reported with the candidate generator that found it (``found_by``: hash variant,
descriptor, both), the check that accepted it (``verified_by``) and the scores (pHash distance, descriptor
cosine, correlations). For every evaluation image the most similar dataset image by descriptor is tracked, so the
report also lists the *nearest unflagged* pairs: the ones a person should look at to trust a "clean" verdict.
The HTML pages through all pairs (and the nearest unflagged) with thumbnails.

This module is the data plane: it never imports ``clip_train``. Predictions come in from the caller
(``flows.audit`` computes them with a checkpoint), as {eval set name: [(eval_id, predicted, label), ...]} or as
a function of the :class:`EvalSet`.

CLI contract (``clipline audit``, see ``flows.audit.main``): ``--dataset D --eval-set SPEC [--eval-set SPEC ...]
--out DIR [--checkpoint RUN_DIR]``; writes DIR/report.json and DIR/report.html (DIR local or s3://).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipelines.core import storage
from pipelines.core.errors import ClipError
from pipelines.decontam import knn
from pipelines.decontam.datasets import DatasetError, iter_dataset
from pipelines.decontam.detector import DetectorConfig, EvalIndex, decode_pool_image, match_batch
from pipelines.decontam.stats import overlap_statistics
from pipelines.evalsets import EvalSetSpecError, load_eval_set

THUMB = 96  # thumbnails larger than this are shrunk (JPEG); smaller ones stay PNG at their own size
MAX_THUMB_PAIRS = 20_000  # pairs shown with thumbnails in the HTML (report.json lists every pair)
N_NEAREST = 200  # nearest unflagged pairs listed per evaluation set
PAGE = 60  # pairs per HTML page

Predictions = Mapping[str, Sequence[tuple]] | Callable[[object], Sequence[tuple]]


class AuditError(ClipError):
    """An audit that cannot run as asked (e.g. a checkpoint without a way to compute its predictions)."""


def _thumb_b64(img: Image.Image) -> str:
    """data: URI of a small thumbnail: PNG at native size up to 64 px (CIFAR-sized, scaled up by the browser),
    JPEG within THUMB px otherwise."""
    im = img.convert("RGB")
    buf = io.BytesIO()
    if max(im.size) <= 64:
        im.save(buf, "PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    im.thumbnail((THUMB, THUMB))
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _small_rgb(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    img = Image.open(io.BytesIO(item))
    if img.format == "JPEG":
        img.draft("RGB", (THUMB, THUMB))
    return img.convert("RGB")


_WORKER: dict = {}


def _worker_init(index_path: str, cfg: dict) -> None:
    """A scan worker process: the index loaded once, one BLAS thread (the processes are the parallelism)."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    _WORKER["limits"] = threadpool_limits(1)
    _WORKER["index"] = EvalIndex.load(index_path)
    _WORKER["cfg"] = DetectorConfig.from_dict(cfg)


def _worker_batch(keys: list[str], greys: list, offset: int):
    """match_batch of one batch in a worker, with the batch's own best-per-entry (merged in order by the caller)."""
    index = _WORKER["index"]
    best = knn.BestPerEntry.empty(0 if index.desc is None else len(index.desc))
    found, _ = match_batch(index, keys, greys, _WORKER["cfg"], best=best, query_offset=offset)
    return found, best.sim, best.query


class _Scan:
    """One pass over the dataset: matches, thumbnails of matched items, each eval row's nearest dataset item.

    With ``workers`` > 1, batches after the first are matched in that many worker processes (the index written
    once to a temporary file and loaded by each), at most two batches a worker in flight (bounded memory); results
    are taken in dataset order and merged exactly as the sequential scan does (matching is per image; the nearest
    item per evaluation row keeps the first of equal similarities), so the report is the same for any number of
    workers. A dataset of one batch never starts a process."""

    def __init__(self, index: EvalIndex, cfg: DetectorConfig, errors: list[str], workers: int = 1):
        self.index, self.cfg, self.errors = index, cfg, errors
        self.workers = max(1, int(workers))
        self.matches = []
        self.thumbs: dict[str, str] = {}
        self.n_items = 0
        n_rows = 0 if index.desc is None else len(index.desc)
        self.best = knn.BestPerEntry.empty(n_rows)
        self.best_key = np.full(n_rows, None, dtype=object)
        self._pool = None
        self._tmp = None
        self._pending: deque = deque()

    def _merge(self, keys, originals, offset, found, sims, queries):
        self.matches.extend(found)
        if len(sims):
            upd = np.flatnonzero(sims > self.best.sim)
            self.best.sim[upd] = sims[upd]
            for r in upd:
                self.best_key[r] = keys[int(queries[r]) - offset]
        hit = {m.pool_key for m in found}
        for k, o in zip(keys, originals):
            if k in hit and k not in self.thumbs and len(self.thumbs) < MAX_THUMB_PAIRS:
                self.thumbs[k] = _thumb_b64(_small_rgb(o))

    def batch(self, keys, greys, originals):
        offset = self.n_items - len(keys)
        if self.workers > 1 and offset > 0:  # a second batch: the dataset is worth the worker processes
            self._submit(keys, greys, originals, offset)
            return
        best = knn.BestPerEntry.empty(len(self.best.sim))
        found, _ = match_batch(self.index, keys, greys, self.cfg, best=best, query_offset=offset)
        self._merge(keys, originals, offset, found, best.sim, best.query)

    def _submit(self, keys, greys, originals, offset):
        if self._pool is None:
            import multiprocessing  # noqa: PLC0415
            import tempfile  # noqa: PLC0415

            self._tmp = tempfile.TemporaryDirectory(prefix="clipline-audit-")
            path = f"{self._tmp.name}/index.npz"
            self.index.save(path)
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=_worker_init, initargs=(path, self.cfg.to_dict()))
        while len(self._pending) >= 2 * self.workers:
            self._take()
        self._pending.append((keys, originals, offset,
                              self._pool.apply_async(_worker_batch, (keys, greys, offset))))

    def _take(self):
        keys, originals, offset, res = self._pending.popleft()
        self._merge(keys, originals, offset, *res.get())

    def finish(self):
        try:
            while self._pending:
                self._take()
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool.join()
                self._pool = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def run(self, dataset: str):
        keys, greys, originals = [], [], []
        for key, item in iter_dataset(dataset, self.errors):
            try:
                # colour kept: the detector's final colour check compares it with the evaluation image
                grey = ((item if item.mode in ("RGB", "L") else item.convert("RGB")) if isinstance(item, Image.Image)
                        else decode_pool_image(item))
            except Exception as exc:  # corrupt image inside a shard: reported, not fatal
                self.errors.append(f"{dataset}: {key}: not a readable image ({type(exc).__name__}: {exc})")
                continue
            self.n_items += 1
            keys.append(key)
            greys.append(grey)
            originals.append(item)
            if len(keys) >= self.cfg.batch_size:
                self.batch(keys, greys, originals)
                keys, greys, originals = [], [], []
        if keys:
            self.batch(keys, greys, originals)


def _fetch_thumbs(dataset: str, wanted: set[str], have: dict[str, str]) -> None:
    """Second pass for the thumbnails of dataset items first known to be wanted after the scan."""
    wanted = wanted - set(have)
    if not wanted:
        return
    for key, item in iter_dataset(dataset, []):
        if key in wanted:
            try:
                have[key] = _thumb_b64(_small_rgb(item))
            except Exception:  # noqa: BLE001 - an unreadable item was reported by the scan already
                pass
            wanted.discard(key)
            if not wanted:
                return


def _predictions_for(predictions: Predictions | None, es) -> list[tuple] | None:
    if predictions is None:
        return None
    if callable(predictions):
        return list(predictions(es))
    if es.name in predictions:
        return list(predictions[es.name])
    if es.spec in predictions:
        return list(predictions[es.spec])
    raise AuditError(f"no predictions for evaluation set {es.name!r} (given for {sorted(predictions)})")


def run_audit(dataset: str, eval_specs: list[str], out_dir: str, checkpoint: str | None = None, *,
              predictions: Predictions | None = None, detector: DetectorConfig | Mapping | None = None,
              n_nearest: int = N_NEAREST, workers: int | None = None, **thresholds) -> dict:
    """Audit ``dataset`` against ``eval_specs``; write out_dir/report.json and report.html; return the report.

    ``predictions`` (see the module docstring) adds the All/Clean/Overlap statistics; ``checkpoint`` is only
    recorded (``flows.audit`` turns it into predictions). ``workers``: processes matching batches (default: the
    CPU count; 1 = in this process). ``detector`` is a :class:`DetectorConfig` (or mapping);
    ``thresholds`` override its fields by flat name (radius, min_ncc, min_gncc, desc_candidate, desc_margin, ...).
    Raises DatasetError / EvalSetSpecError / ConfigError on unusable input.
    """
    if not eval_specs:
        raise EvalSetSpecError("no evaluation set given (use --eval-set SPEC at least once)")
    if checkpoint and predictions is None:
        raise AuditError("a checkpoint needs its zero-shot predictions: run the audit through flows.audit "
                         "(clipline audit), which computes them")
    cfg = DetectorConfig.from_dict(detector) if isinstance(detector, Mapping) else (detector or DetectorConfig())
    cfg = cfg.with_thresholds(**thresholds)
    eval_sets = [load_eval_set(s) for s in eval_specs]
    names = [es.name for es in eval_sets]
    if len(set(names)) != len(names):
        # two sets with one name (e.g. two folders called "val") would merge in the report
        for i, es in enumerate(eval_sets):
            if names.count(es.name) > 1:
                es.name = f"{es.name}#{i}"
    index = EvalIndex.from_eval_sets(eval_sets, descriptor=cfg.descriptor)
    errors: list[str] = [e for es in eval_sets for e in es.errors]
    scan = _Scan(index, cfg, errors, workers=(os.cpu_count() or 1) if workers is None else workers)
    try:
        scan.run(dataset)
    finally:
        scan.finish()

    by_set = defaultdict(list)
    for m in sorted(scan.matches, key=lambda m: (m.eval_set, m.eval_id, m.pool_key)):
        by_set[m.eval_set].append(m)
    model = index.descriptor_for(cfg)
    report = {"dataset": dataset, "n_dataset": scan.n_items, "eval_sets": {}, "errors": errors,
              "detector": cfg.to_dict(),
              "descriptor": None if model is None else {
                  "fingerprint": model.fingerprint, "dim": model.dim, "thresholds": model.meta["thresholds"]}}
    row0 = 0
    nearest_keys: set[str] = set()
    for es in eval_sets:
        pairs = by_set.get(es.name, [])
        ov = sorted({m.eval_id for m in pairs})
        flagged = set(ov)
        nearest = []
        if index.desc is not None:
            sims = scan.best.sim[2 * row0:2 * (row0 + len(es))].reshape(-1, 2)
            which = np.argmax(sims, axis=1)
            best = sims[np.arange(len(es)), which]
            for i in np.argsort(-best, kind="stable"):
                if len(nearest) >= n_nearest or not np.isfinite(best[i]):
                    break
                if es.ids[i] in flagged:
                    continue
                key = scan.best_key[2 * (row0 + i) + int(which[i])]
                nearest.append({"eval_id": es.ids[i], "dataset_key": key, "desc_cos": round(float(best[i]), 4),
                                "mirror": bool(which[i])})
                nearest_keys.add(key)
        row0 += len(es)
        report["eval_sets"][es.name] = {
            "spec": es.spec,
            "n_eval": len(es),
            "n_overlap": len(ov),
            "overlap_rate": (len(ov) / len(es)) if len(es) else 0.0,
            "found_by": dict(sorted(Counter(m.found_by for m in pairs).items())),
            "verified_by": dict(sorted(Counter(m.verified_by for m in pairs).items())),
            "pairs": [{"eval_id": m.eval_id, "dataset_key": m.pool_key, "found_by": m.found_by,
                       "verified_by": m.verified_by, "distance": int(m.distance), "variant": m.variant,
                       "desc_cos": m.desc_cos, "ncc": m.ncc, "gncc": m.gncc} for m in pairs],
            "nearest_unflagged": nearest,
        }
    for es in eval_sets:
        preds = _predictions_for(predictions, es)
        if preds is None:
            continue
        ids = [str(i) for i, _, _ in preds]
        correct = [int(p) == int(lab) for _, p, lab in preds]
        overlap = {p["eval_id"] for p in report["eval_sets"][es.name]["pairs"]}
        report.setdefault("statistics", {})[es.name] = overlap_statistics(ids, correct, overlap)
    if checkpoint:
        report["checkpoint"] = checkpoint
    _fetch_thumbs(dataset, nearest_keys, scan.thumbs)
    storage.write_bytes_atomic(storage.join(out_dir, "report.json"),
                               json.dumps(report, indent=2, sort_keys=True).encode())
    storage.write_bytes_atomic(storage.join(out_dir, "report.html"),
                               render_html(report, eval_sets, scan.thumbs).encode())
    return report


def _fmt(x, pct=True):
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.3g}"


_JS = """
function show(id){const s=SECTIONS[id];const n=Math.max(1,Math.ceil(s.rows.length/PAGE));
s.page=Math.min(Math.max(0,s.page),n-1);const el=document.getElementById(id);let h='';
for(const r of s.rows.slice(s.page*PAGE,(s.page+1)*PAGE)){
h+="<div class='pair'>"+(r[0]>=0?"<img src='"+THUMBS[r[0]]+"'>":"<i>?</i>")+(r[1]>=0?"<img src='"+THUMBS[r[1]]+"'>":
"<i>(no thumbnail)</i>")+"<br>"+r[2]+"</div>";}
el.innerHTML=h;document.getElementById(id+'-nav').textContent='page '+(s.page+1)+' / '+n+' ('+s.rows.length+')';}
function go(id,d){SECTIONS[id].page+=d;show(id);}
window.onload=function(){for(const id in SECTIONS){show(id);}};
"""


def render_html(report: dict, eval_sets, dataset_thumbs: dict[str, str]) -> str:
    """Self-contained HTML (thumbnails embedded as data: URIs): per-set summary, statistics, every matched pair
    and the nearest unflagged pairs, paged (``PAGE`` per page) by a few lines of JavaScript."""
    esc = html.escape
    thumbs: list[str] = []
    slot: dict[tuple[str, str], int] = {}

    def tid(kind: str, key: str, make) -> int:
        if (kind, key) not in slot:
            uri = make()
            if uri is None:
                return -1
            slot[(kind, key)] = len(thumbs)
            thumbs.append(uri)
        return slot[(kind, key)]

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Contamination audit</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}.pair{display:inline-block;margin:6px;padding:4px;border:1px solid #ddd;"
        "font-size:11px;text-align:center;width:210px;vertical-align:top}.pair img{margin:2px;width:96px;"
        "height:96px;object-fit:contain;image-rendering:pixelated}button{margin:0 4px}",
        "</style></head><body>",
        f"<h1>Contamination audit</h1><p>Dataset: <code>{esc(report['dataset'])}</code> "
        f"({report['n_dataset']} images read)</p>",
        "<table><tr><th>evaluation set</th><th>n_eval</th><th>n_overlap</th><th>overlap rate</th>"
        "<th>found by (hash / descriptor / both)</th><th>accepted by</th></tr>",
    ]
    for name, r in report["eval_sets"].items():
        fb = r.get("found_by", {})
        vb = ", ".join(f"{k} {v}" for k, v in r.get("verified_by", {}).items())
        parts.append(f"<tr><td>{esc(name)}</td><td>{r['n_eval']}</td><td>{r['n_overlap']}</td>"
                     f"<td>{_fmt(r['overlap_rate'])}</td><td>{fb.get('hash', 0)} / {fb.get('descriptor', 0)} / "
                     f"{fb.get('both', 0)}</td><td>{esc(vb)}</td></tr>")
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
    sections: dict[str, list] = {}
    by_name = {es.name: es for es in eval_sets}
    n_shown = 0
    for si, (name, r) in enumerate(report["eval_sets"].items()):
        es = by_name[name]
        row_of = {ex_id: i for i, ex_id in enumerate(es.ids)}

        def eval_thumb(ex_id, es=es, row_of=row_of):
            return tid(f"e{name}", ex_id, lambda: _thumb_b64(es.image(row_of[ex_id])))

        def data_thumb(key):
            return tid("d", key, lambda: dataset_thumbs.get(key))

        rows = []
        for p in r["pairs"]:
            with_img = n_shown < MAX_THUMB_PAIRS
            n_shown += with_img
            f2 = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
            cos = "n/a" if p["desc_cos"] is None else f"{p['desc_cos']:.3f}"
            label = (f"eval {esc(p['eval_id'])} | {esc(p['dataset_key'])}<br>found by <b>{p['found_by']}</b>, "
                     f"accepted by {p['verified_by']}<br>pHash d={p['distance'] if p['distance'] >= 0 else '-'} "
                     f"cos={cos} ncc={f2(p['ncc'])} gncc={f2(p['gncc'])}<br>{esc(p['variant'])}")
            rows.append([eval_thumb(p["eval_id"]) if with_img else -1,
                         data_thumb(p["dataset_key"]) if with_img else -1, label])
        sections[f"pairs{si}"] = rows
        near = []
        for p in r.get("nearest_unflagged", []):
            near.append([eval_thumb(p["eval_id"]), data_thumb(p["dataset_key"]),
                         f"eval {esc(p['eval_id'])} | {esc(str(p['dataset_key']))}<br>nearest by descriptor: "
                         f"cos={p['desc_cos']:.3f}{' (mirror)' if p['mirror'] else ''}<br><i>not flagged</i>"])
        sections[f"near{si}"] = near
        for sid, title in ((f"pairs{si}", f"{esc(name)}: matched pairs ({len(rows)}; left evaluation image, "
                                          f"right dataset image)"),
                           (f"near{si}", f"{esc(name)}: nearest unflagged pairs by descriptor ({len(near)}, most "
                                         f"similar first): check these to trust a clean verdict")):
            parts.append(f"<h2>{title}</h2><div><button onclick=\"go('{sid}',-1)\">previous</button>"
                         f"<span id='{sid}-nav'></span><button onclick=\"go('{sid}',1)\">next</button></div>"
                         f"<div id='{sid}'></div>")
    if n_shown >= MAX_THUMB_PAIRS:
        parts.append(f"<p>Thumbnails for the first {MAX_THUMB_PAIRS} pairs only; report.json lists every pair.</p>")
    if report.get("errors"):
        parts.append(f"<h2>Problems ({len(report['errors'])})</h2><ul>")
        parts.extend(f"<li>{esc(e)}</li>" for e in report["errors"][:500])
        parts.append("</ul>")
    data = json.dumps({k: {"rows": v, "page": 0} for k, v in sections.items()})
    parts.append(f"<script>const PAGE={PAGE};const THUMBS={json.dumps(thumbs)};const SECTIONS={data};{_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipline audit", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dataset", required=True, help="shard dir / tar glob / parquet / folder:PATH / eval-set spec")
    ap.add_argument("--eval-set", action="append", required=True, dest="eval_sets")
    ap.add_argument("--out", required=True, help="output directory (local or s3://)")
    ap.add_argument("--checkpoint", help="trained run directory: adds the All/Clean/Overlap zero-shot statistics")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes matching batches (default: the CPU count; 1 = no extra process)")
    ap.add_argument("--radius", type=int)
    ap.add_argument("--min-ncc", type=float)
    ap.add_argument("--min-gncc", type=float)
    ap.add_argument("--desc-candidate", type=float, help="descriptor cosine of a candidate (default: calibrated)")
    ap.add_argument("--desc-margin", type=float, help="margin over the query's 10th most similar (default: "
                                                      "calibrated)")
    ap.add_argument("--no-descriptor", action="store_true", help="hash variants only (the pre-descriptor detector)")
    return ap


def main(argv: list[str] | None = None, predict: Callable[[str, object], Sequence[tuple]] | None = None) -> int:
    """``predict(checkpoint, eval_set)`` -> [(eval_id, predicted, label)] is supplied by ``flows.audit.main``
    (torch code stays out of the data plane)."""
    a = parser().parse_args(argv)
    predictions = (lambda es: predict(a.checkpoint, es)) if (a.checkpoint and predict) else None
    try:
        report = run_audit(a.dataset, a.eval_sets, a.out, a.checkpoint, predictions=predictions,
                           detector=DetectorConfig(descriptor=not a.no_descriptor), radius=a.radius,
                           min_ncc=a.min_ncc, min_gncc=a.min_gncc, desc_candidate=a.desc_candidate,
                           desc_margin=a.desc_margin, workers=a.workers)
    except (DatasetError, EvalSetSpecError, ClipError) as exc:
        print(f"audit: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    for name, r in report["eval_sets"].items():
        print(f"{name}: {r['n_overlap']} / {r['n_eval']} evaluation examples overlap ({100 * r['overlap_rate']:.2f}%)")
    if report["errors"]:
        print(f"{len(report['errors'])} problems (see report.json 'errors')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
