"""Benchmark: copy detection on synthetic webs (what ``make demo`` and the build tests decontaminate), per seed
and per contamination transform.

For each seed a web of ``--pairs`` pairs is generated (``pipelines.synthweb.generate_web``; reused when present
under ``--work``). Evaluation set: the web's held-out images (the ``synth:<web root>`` spec). Pool: every image file
the web serves as an image (``images/orig``, ``images/near``, ``images/copy``; the hostile files are left out),
read straight from disk, so no crawl is needed. Ground truth: ``raw/pairs.parquet`` — a file under
``images/copy`` copies the held-out image in its row's ``contaminates`` column under
``contamination_transform``; every other image is a drawing of a concept and copies nothing (held-out images
are drawn from their own random streams), so any match of it is a false positive (a "look-alike").

Reported per seed: planted copies found (matched to their own source) / missed, look-alikes matched (false
pool images), recall and precision over pool images, per transform recall; ``--show`` writes PNG sheets of the
missed and false pairs (query | held-out image) with their scores.

usage: python benchmarks/dedup_synthweb.py --seeds 0 3 11 [--pairs 4000] [--work DIR] [--out DIR] [--show]
       [--json FILE] [--set name=value ...]   (detector thresholds, DetectorConfig.with_thresholds names)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.decontam.detector import DetectorConfig, EvalIndex, decode_pool_image, match_batch  # noqa: E402
from pipelines.evalsets import load_eval_set  # noqa: E402
from pipelines.synthweb import generate_web  # noqa: E402

POOL_DIRS = ("orig", "near", "copy")


def load_pool(root: Path):
    """(keys, images, truth {key: held-out id}, transform {key: family}) of one web's served images."""
    t = pq.read_table(root / "raw" / "pairs.parquet",
                      columns=["pair_id", "contaminates", "contamination_transform"]).to_pylist()
    contam = {r["pair_id"]: (r["contaminates"], r["contamination_transform"]) for r in t if r["contaminates"]}
    keys, imgs, truth, family = [], [], {}, {}
    for sub in POOL_DIRS:
        for f in sorted((root / "images" / sub).glob("*.jpg")):
            key = f"{sub}/{f.stem}"
            try:
                img = decode_pool_image(f.read_bytes())
            except Exception:  # noqa: BLE001 - a file the web serves broken on purpose
                continue
            keys.append(key)
            imgs.append(img)
            if sub == "copy":
                truth[key], family[key] = contam[f.stem]
    return keys, imgs, truth, family


def evaluate(root: Path, cfg: DetectorConfig, batch: int = 512):
    es = load_eval_set(f"synth:{root}")
    index = EvalIndex.from_eval_sets([es])
    keys, imgs, truth, family = load_pool(root)
    t0 = time.perf_counter()
    matches, recs = [], []
    for s in range(0, len(keys), batch):
        m, r = match_batch(index, keys[s:s + batch], imgs[s:s + batch], cfg)
        matches += m
        recs += r
    dt = time.perf_counter() - t0
    matched: dict[str, set] = {}
    for m in matches:
        matched.setdefault(m.pool_key, set()).add(m.eval_id)
    found = {k for k, e in truth.items() if e in matched.get(k, ())}
    false = {k for k in matched if k not in truth}
    wrong = {k for k in matched if k in truth and truth[k] not in matched[k]}  # a copy matched to another image only
    n_pred = len(matched)
    res = {"root": str(root), "pool": len(keys), "eval": len(index), "copies": len(truth), "found": len(found),
           "missed": sorted(set(truth) - found), "false": sorted(false), "wrong_source": sorted(wrong),
           "recall": len(found) / max(1, len(truth)), "precision": len(found) / max(1, n_pred),
           "seconds": round(dt, 1), "per_transform": {}}
    for fam in sorted(set(family.values())):
        ks = [k for k in truth if family[k] == fam]
        res["per_transform"][fam] = {"n": len(ks), "found": sum(k in found for k in ks)}
    return res, recs, index, keys, imgs, truth, family


def render(pairs, index, keys, imgs, path: Path) -> None:
    """PNG sheet, one row per pair: pool image | held-out image | scores."""
    kpos = {k: i for i, k in enumerate(keys)}
    epos = {e: i for i, e in enumerate(index.ids)}
    cell = 96
    sheet = Image.new("RGB", (cell * 2 + 560, cell * max(1, len(pairs))), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (k, e, text) in enumerate(pairs):
        q = imgs[kpos[k]].convert("RGB")
        q.thumbnail((cell, cell))
        sheet.paste(q, (0, r * cell))
        if e in epos:
            ev = Image.fromarray(index.cthumbs[epos[e]], "RGB").resize((cell, cell))
            sheet.paste(ev, (cell, r * cell))
        draw.text((2 * cell + 4, r * cell + 4), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def describe(rec: dict | None) -> str:
    if rec is None:
        return "no candidate"
    keys = ("found_by", "distance", "desc_cos", "desc_margin", "variant", "ncc", "gncc", "screen", "align",
            "hue_turn", "edge_recall", "edge_blocks", "edge_precision", "accepted")
    out, line = [], ""
    for k in keys:
        s = f"{k}={rec.get(k)} "
        if len(line) + len(s) > 90:
            out.append(line)
            line = ""
        line += s
    return "\n".join(out + [line])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 11])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--work", default="/tmp/clipline_synthwebs")
    ap.add_argument("--out", default=str(ROOT / "out" / "dedup_synthweb"))
    ap.add_argument("--show", action="store_true", help="write PNG sheets of missed and false pairs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dump", default=None, help="write every candidate pair with its scores and truth (JSON lines)")
    ap.add_argument("--set", nargs="*", default=[], help="detector thresholds name=value")
    args = ap.parse_args(argv)
    kw = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = DetectorConfig().with_thresholds(**kw) if kw else DetectorConfig()
    out = Path(args.out)
    results = {}
    tot = {"copies": 0, "found": 0, "false": 0, "wrong": 0}
    fam_tot: dict[str, list[int]] = {}
    for seed in args.seeds:
        root = Path(args.work) / f"web{seed}_{args.pairs}"
        generate_web(root, n_pairs=args.pairs, seed=seed)
        res, recs, index, keys, imgs, truth, family = evaluate(root, cfg)
        results[seed] = res
        tot["copies"] += res["copies"]
        tot["found"] += res["found"]
        tot["false"] += len(res["false"])
        tot["wrong"] += len(res["wrong_source"])
        for fam, v in res["per_transform"].items():
            a = fam_tot.setdefault(fam, [0, 0])
            a[0] += v["n"]
            a[1] += v["found"]
        fams = " ".join(f"{f}={v['found']}/{v['n']}" for f, v in res["per_transform"].items())
        print(f"seed {seed}: pool {res['pool']} eval {res['eval']} copies {res['copies']} found {res['found']} "
              f"missed {len(res['missed'])} false {len(res['false'])} wrong-source {len(res['wrong_source'])} "
              f"R {res['recall']:.3f} P {res['precision']:.3f} ({res['seconds']} s)\n  {fams}", flush=True)
        if args.dump:
            with open(args.dump, "a") as fh:
                for r in recs:
                    t = truth.get(r["pool_key"])
                    fh.write(json.dumps({**r, "seed": seed, "truth": "copy" if t == r["eval_id"] else
                                         ("other" if t else "lookalike"), "family": family.get(r["pool_key"], "")},
                                        default=str) + "\n")
        if args.show:
            by_pair: dict[tuple[str, str], dict] = {}
            for r in recs:
                by_pair[(r["pool_key"], r["eval_id"])] = r
            missed = [(k, truth[k], f"MISSED {k} {family[k]} -> {truth[k]}\n"
                       + describe(by_pair.get((k, truth[k])))) for k in res["missed"]]
            falses = []
            for k in res["false"]:
                for (pk, e), r in by_pair.items():
                    if pk == k and r["accepted"]:
                        falses.append((k, e, f"FALSE {k} -> {e} by {r['verified_by']}\n" + describe(r)))
            if missed:
                render(missed, index, keys, imgs, out / f"seed{seed}_missed.png")
            if falses:
                render(falses, index, keys, imgs, out / f"seed{seed}_false.png")
            (out / f"seed{seed}_pairs.json").write_text(json.dumps(
                {"missed": [by_pair.get((k, truth[k])) for k in res["missed"]],
                 "false": [r for (pk, e), r in sorted(by_pair.items()) if pk in set(res["false"]) and r["accepted"]]},
                indent=1, default=str))
    pred = tot["found"] + tot["false"] + tot["wrong"]
    print(f"ALL: copies {tot['copies']} found {tot['found']} false {tot['false']} wrong-source {tot['wrong']} "
          f"R {tot['found'] / max(1, tot['copies']):.3f} P {tot['found'] / max(1, pred):.3f}")
    print("per transform: " + " ".join(f"{f}={a[1]}/{a[0]} ({a[1] / max(1, a[0]):.3f})"
                                       for f, a in sorted(fam_tot.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": kw, "seeds": results, "total": tot,
                                               "per_transform": fam_tot}, indent=1))


if __name__ == "__main__":
    main()
