"""Benchmark: near-duplicate detection quality on planted copies of CIFAR-10 test images among same-class
look-alikes, component by component.

Evaluation set: ``--n-eval`` CIFAR-10 test images (all classes, a seeded random subset). Planted copies: each
transform family of pipelines.decontam.augment (including the small-translation ``shift`` (1-4 px at 32 px),
``colour_shift`` and ``recrop`` families) applied to random evaluation images. Distractors: CIFAR-10 *train*
images of the same classes (half of them transformed too): same-distribution, same-class look-alikes.

CIFAR-10's train and test sets share real near-duplicates, so some distractors *are* copies of an evaluation
image. A distractor match is therefore a false positive unless a person has looked at the pair and labelled it a
real copy (``benchmarks/dedup_cifar_labels.py``; ``--render-distractor-matches`` writes every distractor match to
PNG sheets of the matches not yet labelled); unlabelled matches count as false positives. A planted copy of evaluation image A matched
to evaluation image B != A is a *twin match*, not a false positive, when A and B are near-duplicates inside the
evaluation set (found by the detector on the evaluation set against itself); twin matches are counted apart.

Columns (each read off one detector run; every candidate keeps all its scores):
- ``pHash r8``: one pHash per image, radius 8 (the textbook baseline);
- ``hash cands``: hash-variant candidates (stage 1a);
- ``desc cands``: copy-descriptor candidates at the calibrated threshold (stage 1b);
- ``hash+check``: hash candidates accepted by the variant check: the detector before the descriptor;
- ``grey checks``: both generators, variant or alignment check passed: the detector without its colour check;
- ``detector``: the default detector (both generators; variant or alignment check, then the colour check).

usage: python benchmarks/dedup_quality.py [--per-transform 150] [--n-eval 5000] [--distractors 10000]
       [--out OUT_DIR] [--render-distractor-matches] [--set name=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipelines.decontam import augment  # noqa: E402
from pipelines.decontam.detector import DetectorConfig, EvalIndex, match_batch  # noqa: E402
from pipelines.decontam.hashing import phash64_batch  # noqa: E402
from pipelines.decontam.mih import MultiIndexHash  # noqa: E402
from pipelines.evalsets import load_eval_set  # noqa: E402

try:
    from dedup_cifar_labels import REAL_COPIES, NOT_COPIES  # noqa: E402
except ImportError:  # pragma: no cover
    REAL_COPIES, NOT_COPIES = set(), set()


def shared_data() -> Path:
    return Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT / ".." / "shared" / "data"))


def cifar_dir() -> str:
    conv = shared_data() / "cifar10" / "to_python_format.py"
    if not conv.exists():
        sys.exit(f"CIFAR-10 not found at {conv.parent} (set CLIPLINE_SHARED_DATA)")
    tmp = tempfile.mkdtemp(prefix="cifar10-")
    subprocess.run([sys.executable, str(conv), tmp], check=True, capture_output=True)
    return tmp


def run_matching(index, keys, imgs, cfg, batch=1024):
    matches, cands = [], []
    for s in range(0, len(keys), batch):
        m, c = match_batch(index, keys[s:s + batch], imgs[s:s + batch], cfg)
        matches += m
        cands += c
    return matches, cands


def prf(pred: set, truth: dict, keys: list[str], twins: set, real: set) -> dict:
    """tp, fp, twin matches, real-copy matches (labelled distractor copies), precision, recall."""
    ks = set(keys)
    mine = [p for p in pred if p[0] in ks]
    tp = sum(1 for k, e in mine if truth.get(k) == e)
    tw = sum(1 for k, e in mine if k in truth and truth[k] != e and (truth[k], e) in twins)
    rc = sum(1 for k, e in mine if k not in truth and (k, e) in real)
    fp = len(mine) - tp - tw - rc
    pos = [k for k in keys if k in truth]
    rec = (sum(1 for k in pos if (k, truth[k]) in pred) / len(pos)) if pos else float("nan")
    return {"tp": tp, "fp": fp, "twin": tw, "real_copy": rc, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": rec}


COLUMNS = [("phash_r8", "pHash r8"), ("hash_cands", "hash cands"), ("desc_cands", "desc cands"),
           ("hash_check", "hash+check"), ("grey_checks", "grey checks"), ("detector", "detector")]


def table(rows) -> list[str]:
    head = " | ".join(f"{t} P | {t} R" for _, t in COLUMNS)
    out = [f"| transform | n | {head} |", "|---|---|" + "---|---|" * len(COLUMNS)]
    for r in rows:
        cells = " | ".join(f"{r[c]['precision']:.3f} | {r[c]['recall']:.3f}" for c, _ in COLUMNS)
        out.append(f"| {r['transform']} | {r['n']} | {cells} |")
    return out


def sheet(pairs, left, right, path: Path, captions=None, per_row=10) -> None:
    """PNG contact sheet of (left id, right id) pairs, 4x enlarged, with a caption line under each pair."""
    n = len(pairs)
    rows = (n + per_row - 1) // per_row
    cw, ch = 2 * 128 + 12, 128 + 24
    img = Image.new("RGB", (per_row * cw, max(1, rows) * ch), "white")
    d = ImageDraw.Draw(img)
    for i, (a, b) in enumerate(pairs):
        x, y = (i % per_row) * cw, (i // per_row) * ch
        img.paste(left(a).convert("RGB").resize((128, 128), Image.Resampling.NEAREST), (x, y))
        img.paste(right(b).convert("RGB").resize((128, 128), Image.Resampling.NEAREST), (x + 130, y))
        d.text((x + 2, y + 129), captions[i] if captions else f"{i}: {a} | {b}", fill="black")
    img.save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-transform", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=5000)
    ap.add_argument("--distractors", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "out" / "dedup_quality"))
    ap.add_argument("--render-distractor-matches", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="detector settings name=value (DetectorConfig.with_thresholds)")
    a = ap.parse_args(argv)
    tmp = cifar_dir()
    test, train = load_eval_set(f"cifar10:{tmp}"), load_eval_set(f"cifar10:{tmp}:train")
    rng = np.random.default_rng(a.seed)
    kw = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)}
    cfg = DetectorConfig().with_thresholds(**kw) if kw else DetectorConfig()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    eval_rows = sorted(rng.choice(len(test), a.n_eval, replace=False).tolist())
    eval_classes = {test.labels[i] for i in eval_rows}
    t0 = time.perf_counter()
    index = EvalIndex.build(("cifar10", test.ids[i], test.image(i)) for i in eval_rows)
    model = index.descriptor_for(cfg)
    t_cand = model.threshold("candidate")
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    self_matches, _ = run_matching(index, [test.ids[i] for i in eval_rows], [test.image(i) for i in eval_rows], cfg)
    twins = {(m.pool_key, m.eval_id) for m in self_matches if m.pool_key != m.eval_id}
    twins |= {(e, k) for k, e in twins}
    t_twins = time.perf_counter() - t0
    print(f"evaluation set: {len(eval_rows)} images; {len(twins) // 2} near-duplicate pairs inside it "
          f"({len({k for k, _ in twins})} images, {t_twins:.0f} s)")

    keys, imgs, truth, family = [], [], {}, {}
    for name in augment.TRANSFORMS:
        for k in range(a.per_transform):
            i = int(rng.choice(eval_rows))
            key = f"planted/{name}/{k}"
            keys.append(key)
            imgs.append(augment.apply(name, test.image(i), rng))
            truth[key] = test.ids[i]
            family[key] = name
    distractor_rows = [i for i, lab in enumerate(train.labels) if lab in eval_classes]
    names = list(augment.TRANSFORMS)
    dtrans = {}
    for n, i in enumerate(rng.choice(distractor_rows, a.distractors, replace=False)):
        img = train.image(int(i))
        if n % 2:
            dtrans[f"distractor/{int(i)}"] = names[int(rng.integers(len(names)))]
            img = augment.apply(dtrans[f"distractor/{int(i)}"], img, rng)
        keys.append(f"distractor/{int(i)}")
        imgs.append(img)

    t0 = time.perf_counter()
    eh = phash64_batch([test.image(i) for i in eval_rows])
    qi, ti, _ = MultiIndexHash(eh, radius_hint=8).search(phash64_batch(imgs), 8)
    base_pred = {(keys[q], test.ids[eval_rows[t]]) for q, t in zip(qi, ti)}
    t0 = time.perf_counter()
    matches, cands = run_matching(index, keys, imgs, cfg)
    t_det = time.perf_counter() - t0
    preds = {
        "phash_r8": base_pred,
        "hash_cands": {(c["pool_key"], c["eval_id"]) for c in cands if c["found_by"] in ("hash", "both")},
        "desc_cands": {(c["pool_key"], c["eval_id"]) for c in cands if c["found_by"] in ("descriptor", "both")},
        "hash_check": {(c["pool_key"], c["eval_id"]) for c in cands if c["variant_passed"]},
        # both candidate generators and the grey checks (variant, alignment), before the colour check
        "grey_checks": {(c["pool_key"], c["eval_id"]) for c in cands if c["variant_passed"] or c["align_passed"]},
        "detector": {(m.pool_key, m.eval_id) for m in matches},
    }
    real = {(f"distractor/{tr}", str(te)) for te, tr in REAL_COPIES}
    rows = []
    for name in list(augment.TRANSFORMS) + ["ALL"]:
        ks = [k for k in keys if family.get(k) == name] if name != "ALL" else keys
        row = {"transform": name, "n": sum(1 for k in ks if k in truth)}
        for label, _ in COLUMNS:
            row[label] = prf(preds[label], truth, ks, twins, real)
        rows.append(row)
    distractor_keys = [k for k in keys if k.startswith("distractor/")]
    dist = {label: prf(preds[label], truth, distractor_keys, twins, real) for label, _ in COLUMNS}
    det_dm = sorted((k, e) for k, e in preds["detector"] if k.startswith("distractor/"))
    unlabelled = [(k, e) for k, e in det_dm if (int(e), int(k.split("/")[1])) not in REAL_COPIES | NOT_COPIES]
    found_by = {}
    for m in matches:
        if truth.get(m.pool_key) == m.eval_id:
            found_by.setdefault(family[m.pool_key], {}).setdefault(m.found_by, 0)
            found_by[family[m.pool_key]][m.found_by] += 1
    verified_by = {}
    for m in matches:
        verified_by[m.verified_by] = verified_by.get(m.verified_by, 0) + 1
    misses = {name: [k for k in keys if family.get(k) == name and (k, truth[k]) not in preds["detector"]]
              for name in augment.TRANSFORMS}

    print(f"eval images {len(eval_rows)} (index {len(index.hashes):,} hashes + {len(index.desc):,} descriptors, "
          f"{t_index:.0f} s); planted {len(truth)}; distractors {len(distractor_keys)} (same classes); detector "
          f"{t_det:.0f} s; descriptor candidate threshold {t_cand}\n")
    print("\n".join(table(rows)))
    print("\nmatches on distractors (false / labelled real CIFAR copies): " + ", ".join(
        f"{label} {dist[label]['fp']} / {dist[label]['real_copy']}" for label, _ in COLUMNS))
    print(f"detector distractor matches not yet labelled by a person (counted as false): {len(unlabelled)}")
    print("twin matches (not counted): " + ", ".join(f"{label} {rows[-1][label]['twin']}" for label, _ in COLUMNS))
    print(f"true matches by generator: {json.dumps(found_by)}; accepted by: {verified_by}")
    print("misses per family: " + json.dumps({k: len(v) for k, v in misses.items()}))

    result = {"rows": rows, "distractors": dist, "unlabelled_distractor_matches": unlabelled,
              "distractor_matches": det_dm,
              "twin_pairs": len(twins) // 2, "n_eval": len(eval_rows), "n_distractors": len(distractor_keys),
              "config": cfg.to_dict(), "descriptor": model.fingerprint, "thresholds": model.meta["thresholds"],
              "found_by": found_by, "verified_by": verified_by, "misses": misses,
              "seconds": {"index": t_index, "twins": t_twins, "detector": t_det}}
    (out / "dedup_quality.json").write_text(json.dumps(result, indent=1, default=float))
    by_key = dict(zip(keys, imgs))
    eval_img = {test.ids[i]: test.image(i) for i in eval_rows}
    miss_pairs = [(k, truth[k]) for v in misses.values() for k in v]
    if miss_pairs:
        sheet(miss_pairs[:200], by_key.__getitem__, eval_img.__getitem__, out / "misses.png",
              [f"{i}: {k.split('/')[1]} -> {e}" for i, (k, e) in enumerate(miss_pairs[:200])])
    if a.render_distractor_matches and unlabelled:  # the pairs a person still has to look at
        cap = {(c["pool_key"], c["eval_id"]): c for c in cands}
        for s in range(0, len(unlabelled), 50):
            chunk = unlabelled[s:s + 50]
            sheet(chunk, by_key.__getitem__, eval_img.__getitem__,
                  out / f"distractor_matches_{s // 50}.png",
                  [f"{s + i}: tr{k.split('/')[1]}{'*' if k in dtrans else ''} te{e} "
                   f"{cap[(k, e)]['verified_by']} {cap[(k, e)]['desc_cos']}" for i, (k, e) in enumerate(chunk)])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
