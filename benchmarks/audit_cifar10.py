"""Benchmark: the real-data contamination audit, CIFAR-10 train (50,000) against CIFAR-10 test (10,000).

Runs exactly what ``clipline audit --dataset cifar10:DIR:train --eval-set cifar10:DIR --out OUT`` runs (timed, with
the machine's load average before and after, since the development machine is shared), prints the number of
test images flagged, how the pairs were found (hash variants / descriptor / both) and accepted, and writes PNG
contact sheets for a person to inspect:
- ``flagged_sample_*.png``: a seeded random sample of flagged test images, each with its best train match;
- ``nearest_unflagged_*.png``: the unflagged test images nearest to a train image by the descriptor, most
  similar first (where missed copies would be);
- ``inspection.html``: both samples on one page with thumbnails;
each pair captioned with its sheet position, test / train index and scores. ``--compare-hash-only`` also runs the
detector without the descriptor (the previous default) for the flagged count it gives.

``--truth LIST_CSV`` also scores the report against a list of known near-duplicates in ciFAIR's format
(``benchmarks/duplicate_list_recall.py``: recall per judgment, and the misses).

usage: python benchmarks/audit_cifar10.py [--out OUT_DIR] [--sample 100] [--compare-hash-only] [--truth LIST_CSV]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from dedup_quality import cifar_dir, sheet  # noqa: E402
from duplicate_list_recall import InputError, read_list, render, score as score_list  # noqa: E402

from pipelines.decontam.audit import run_audit  # noqa: E402
from pipelines.decontam.detector import DetectorConfig  # noqa: E402
from pipelines.evalsets import load_eval_set  # noqa: E402


def _img_tag(img) -> str:
    import base64  # noqa: PLC0415
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    img.convert("RGB").resize((96, 96), Image.Resampling.NEAREST).save(buf, "PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width=96 height=96>'


def write_inspection_html(path: Path, sampled, nearest, test, train, n_flagged: int, wall: float) -> None:
    """One page for a person: the random flagged sample (test | best train match) and the nearest unflagged test
    images (test | nearest train image by descriptor), thumbnails 3x enlarged, numbered as on the PNG sheets."""
    from html import escape  # noqa: PLC0415

    def rows(pairs, flagged):
        out = []
        for i, p in enumerate(pairs):
            cap = (f"found by {p['found_by']}, accepted by {p['verified_by']}, cos {p['desc_cos'] or 0:.3f}, "
                   f"{escape(str(p.get('variant') or ''))}" if flagged else f"descriptor cos {p['desc_cos']:.3f}")
            out.append(f"<tr><td>{i}</td><td>{_img_tag(test.image(int(p['eval_id'])))}</td>"
                       f"<td>{_img_tag(train.image(int(p['dataset_key'])))}</td><td>test {escape(str(p['eval_id']))}"
                       f"<br>train {escape(str(p['dataset_key']))}<br>{cap}</td></tr>")
        return "\n".join(out)

    html = (f"<!doctype html><meta charset=utf-8><title>CIFAR-10 train vs test audit: inspection</title>"
            f"<style>body{{font-family:sans-serif}} td{{padding:2px 8px;vertical-align:middle}}</style>"
            f"<h1>CIFAR-10 train vs test: {n_flagged} test images flagged ({wall:.0f} s)</h1>"
            f"<h2>Random {len(sampled)} flagged test images (test | best train match)</h2><table>"
            f"{rows(sampled, True)}</table><h2>The {len(nearest)} unflagged test images nearest to a train image "
            f"by the descriptor (test | nearest train image), most similar first</h2><table>{rows(nearest, False)}"
            f"</table>")
    path.write_text(html)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "out" / "audit_cifar10"))
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-hash-only", action="store_true")
    ap.add_argument("--truth", default=None, help="known near-duplicates, ciFAIR's meta/duplicates_cifar10.csv format")
    ap.add_argument("--set", nargs="*", default=[], help="detector settings name=value (DetectorConfig.with_thresholds)")
    a = ap.parse_args(argv)
    kw = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)}
    try:
        truth = read_list(a.truth) if a.truth else None  # a bad list fails here, before the audit
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    detector = DetectorConfig().with_thresholds(**kw) if kw else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = cifar_dir()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = run_audit(f"cifar10:{tmp}:train", [f"cifar10:{tmp}"], str(out / "report"), detector=detector)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_workers = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
    load1 = os.getloadavg()
    r = report["eval_sets"]["cifar10"]
    print(f"CIFAR-10 train vs test audit: {r['n_overlap']} of {r['n_eval']} test images flagged "
          f"({100 * r['overlap_rate']:.2f}%), {len(r['pairs'])} pairs; found by {r['found_by']}; accepted by "
          f"{r['verified_by']}; {wall:.0f} s wall, {cpu:.0f} s CPU in this process + {cpu_workers:.0f} s in worker "
          f"processes; load average "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} cores")
    result = {"n_flagged": r["n_overlap"], "n_pairs": len(r["pairs"]), "found_by": r["found_by"],
              "verified_by": r["verified_by"], "wall_s": wall, "cpu_s": cpu, "cpu_workers_s": cpu_workers,
              "load_before": load0,
              "load_after": load1, "thresholds": report["descriptor"]["thresholds"]}
    if a.compare_hash_only:
        t0 = time.perf_counter()
        old = run_audit(f"cifar10:{tmp}:train", [f"cifar10:{tmp}"], str(out / "report_hash_only"),
                        detector=DetectorConfig(descriptor=False, align=False))
        ro = old["eval_sets"]["cifar10"]
        result["hash_only"] = {"n_flagged": ro["n_overlap"], "n_pairs": len(ro["pairs"]),
                               "wall_s": time.perf_counter() - t0}
        print(f"hash variants + variant check only (previous default): {ro['n_overlap']} flagged, "
              f"{len(ro['pairs'])} pairs, {result['hash_only']['wall_s']:.0f} s")

    test, train = load_eval_set(f"cifar10:{tmp}"), load_eval_set(f"cifar10:{tmp}:train")
    best_pair = {}
    for p in r["pairs"]:
        score = (p["desc_cos"] or 0, p["gncc"] or 0)
        if p["eval_id"] not in best_pair or score > best_pair[p["eval_id"]][0]:
            best_pair[p["eval_id"]] = (score, p)
    flagged = sorted(best_pair, key=int)
    rng = np.random.default_rng(a.seed)
    sample = sorted(rng.choice(flagged, min(a.sample, len(flagged)), replace=False).tolist(), key=int)
    sampled = [best_pair[e][1] for e in sample]
    nearest = r["nearest_unflagged"][: a.sample]
    for name, rows in (("flagged_sample", sampled), ("nearest_unflagged", nearest)):
        for s in range(0, len(rows), 50):
            chunk = rows[s:s + 50]
            caps = [f"te{p['eval_id']} tr{p['dataset_key']} " + (
                f"{p['found_by'][0]}/{p['verified_by'][0]} c={p['desc_cos'] or 0:.2f}" if "found_by" in p
                else f"c={p['desc_cos']:.3f}") for p in chunk]
            sheet([(p["eval_id"], p["dataset_key"]) for p in chunk], lambda e: test.image(int(e)),
                  lambda k: train.image(int(k)), out / f"{name}_{s // 50}.png",
                  [f"{s + i}: {c}" for i, c in enumerate(caps)])
    write_inspection_html(out / "inspection.html", sampled, nearest, test, train, r["n_overlap"], wall)
    result["flagged_sample"] = [(p["eval_id"], p["dataset_key"]) for p in sampled]
    result["nearest_unflagged"] = [(p["eval_id"], p["dataset_key"], p["desc_cos"]) for p in nearest]
    if truth is not None:
        result["known_duplicates"] = score_list(r, truth)
        print(render(result["known_duplicates"]))
    (out / "audit_cifar10.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
