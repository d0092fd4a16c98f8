"""Benchmark: near-duplicate detection quality on planted CIFAR-10 copies, and CIFAR-10 train-vs-test overlap.

Evaluation set: CIFAR-10 test images of classes 0-4 (airplane, automobile, bird, cat, deer). Planted copies: each
transform family of pipelines.decontam.augment applied to random evaluation images. Distractors: CIFAR-10 train
images of classes 5-9 (dog, frog, horse, ship, truck; half of them also transformed), which are same-distribution
look-alikes (cat/dog, automobile/truck, airplane/ship, deer/horse) yet cannot be true duplicates of the evaluation
images, since CIFAR duplicates share their class. Reports precision/recall per transform for (a) one pHash at
radius 8 and (b) the detector, component by component: hash candidates, + the hand-made check (the default
detector), the learned check (CLIP appendix C, trained here on the evaluation thumbnails) alone and on top of the
hand check. A planted copy matched to an evaluation image that is itself a near-duplicate of its source (found by
the same detector inside the evaluation set) is counted apart, not as a false positive. Then runs the default
detector on all 10,000 test images vs all 50,000 training images and writes an HTML page with a sample of pairs.

usage: python benchmarks/dedup_quality.py [--per-transform 150] [--distractors 10000] [--out OUT_DIR] [--no-overlap]
       [--no-learned] [--learn-steps 400] [--net PATH (reuse/save the learned net)] [--radius R]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.decontam import augment  # noqa: E402
from pipelines.decontam.audit import _thumb_b64  # noqa: E402
from pipelines.decontam.detector import DetectorConfig, EvalIndex, match_batch  # noqa: E402
from pipelines.decontam.learned import LearnedConfig, NearDupEmbedder  # noqa: E402
from pipelines.decontam.hashing import phash64_batch  # noqa: E402
from pipelines.decontam.mih import MultiIndexHash  # noqa: E402
from pipelines.evalsets import load_eval_set  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT / ".." / "shared" / "data"))


def prf(pred: set, truth: dict, keys: list[str], twins: set | frozenset = frozenset()) -> tuple[int, int, int, float]:
    """(true positives, false positives, twin matches, recall) of predicted (pool key, eval id) pairs.

    A planted copy of evaluation image A matched to evaluation image B != A is a *twin match*, not a false
    positive, when (A, B) is itself a near-duplicate pair inside the evaluation set (``twins``, both orders):
    a copy of A is then also a copy of B. Twin matches are counted apart and left out of precision."""
    ks = set(keys)
    mine = [p for p in pred if p[0] in ks]
    tp = sum(1 for k, e in mine if truth.get(k) == e)
    tw = sum(1 for k, e in mine if k in truth and truth[k] != e and (truth[k], e) in twins)
    pos = [k for k in keys if k in truth]
    rec = (sum(1 for k in pos if (k, truth[k]) in pred) / len(pos)) if pos else float("nan")
    return tp, len(mine) - tp - tw, tw, rec


def run_matching(index, keys, imgs, cfg):
    matches, cands = [], []
    for s in range(0, len(keys), cfg.batch_size):
        m, c = match_batch(index, keys[s:s + cfg.batch_size], imgs[s:s + cfg.batch_size], cfg)
        matches += m
        cands += c
    return matches, cands


COLUMNS = [("phash_r8", "pHash r8"), ("stage1", "hash candidates"), ("hand", "+ hand check"),
           ("learned_only", "+ learned check only"), ("detector", "+ hand + learned")]


def table(rows, cols) -> list[str]:
    head = " | ".join(f"{t} P | {t} R" for _, t in cols)
    out = [f"| transform | n | {head} |", "|---|---|" + "---|---|" * len(cols)]
    for r in rows:
        cells = " | ".join(f"{r[c]['precision']:.3f} | {r[c]['recall']:.3f}" for c, _ in cols)
        out.append(f"| {r['transform']} | {r['n']} | {cells} |")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-transform", type=int, default=150)
    ap.add_argument("--distractors", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "out" / "dedup_quality"))
    ap.add_argument("--no-overlap", action="store_true", help="skip the full CIFAR-10 train-vs-test run")
    ap.add_argument("--no-learned", action="store_true", help="skip training the learned near-duplicate net")
    ap.add_argument("--learn-steps", type=int, default=LearnedConfig().steps)
    ap.add_argument("--radius", type=int, default=DetectorConfig().radius)
    ap.add_argument("--net", help="reuse the learned net saved at this path (trained and saved there if absent)")
    a = ap.parse_args(argv)
    conv = shared_data() / "cifar10" / "to_python_format.py"
    if not conv.exists():
        sys.exit(f"CIFAR-10 not found at {conv.parent} (set CLIPLINE_SHARED_DATA)")
    tmp = tempfile.mkdtemp(prefix="cifar10-")
    subprocess.run([sys.executable, str(conv), tmp], check=True, capture_output=True)
    test, train = load_eval_set(f"cifar10:{tmp}"), load_eval_set(f"cifar10:{tmp}:train")
    rng = np.random.default_rng(a.seed)
    # The default detector is hashes + hand check (learned=False); the learned check is switched on here so that one
    # run scores every candidate with both checks.
    cfg = DetectorConfig(radius=a.radius, learned=not a.no_learned)
    hand_cfg = replace(cfg, learned=False)

    eval_rows = [i for i, lab in enumerate(test.labels) if lab < 5]
    t0 = time.perf_counter()
    index = EvalIndex.build(("cifar10", test.ids[i], test.image(i)) for i in eval_rows)
    t_index = time.perf_counter() - t0
    # Near-duplicates inside the evaluation set itself, found by the same detector (hand check): a planted copy of
    # one of them matched to its twin is counted apart, neither as a hit nor as a false positive.
    t0 = time.perf_counter()
    self_matches, _ = run_matching(index, [test.ids[i] for i in eval_rows], [test.image(i) for i in eval_rows],
                                   hand_cfg)
    twins = {(m.pool_key, m.eval_id) for m in self_matches if m.pool_key != m.eval_id}
    twins |= {(e, k) for k, e in twins}
    n_twin_imgs = len({k for k, _ in twins})
    t_twins = time.perf_counter() - t0
    print(f"evaluation set: {len(eval_rows)} images; {len(twins) // 2} near-duplicate pairs inside it "
          f"({n_twin_imgs} images, {t_twins:.0f} s)")

    keys, imgs, truth, family = [], [], {}, {}
    for name in augment.TRANSFORMS:
        for k in range(a.per_transform):
            i = int(rng.choice(eval_rows))
            key = f"planted/{name}/{k}"
            keys.append(key)
            imgs.append(augment.apply(name, test.image(i), rng))
            truth[key] = test.ids[i]
            family[key] = name
    distractor_rows = [i for i, lab in enumerate(train.labels) if lab >= 5]
    names = list(augment.TRANSFORMS)
    for n, i in enumerate(rng.choice(distractor_rows, a.distractors, replace=False)):
        img = train.image(int(i))
        if n % 2:
            img = augment.apply(names[int(rng.integers(len(names)))], img, rng)
        keys.append(f"distractor/{int(i)}")
        imgs.append(img)

    # (a) one pHash per image, radius 8 (full image vs full image)
    t0 = time.perf_counter()
    eh = phash64_batch([test.image(i) for i in eval_rows])
    qi, ti, _ = MultiIndexHash(eh, radius_hint=8).search(phash64_batch(imgs), 8)
    base_pred = {(keys[q], test.ids[eval_rows[t]]) for q, t in zip(qi, ti)}
    t_base = time.perf_counter() - t0
    t_train = 0.0
    if not a.no_learned:
        t0 = time.perf_counter()
        if a.net and os.path.exists(a.net):
            index.attach_learned(NearDupEmbedder.load(a.net))
            print(f"learned near-duplicate net: loaded {a.net}")
        else:
            index.train_learned(LearnedConfig(steps=a.learn_steps), log=print)
            t_train = time.perf_counter() - t0
            print(f"learned near-duplicate net: {a.learn_steps} steps on {len(eval_rows)} thumbnails, {t_train:.0f} s")
            if a.net:
                index.embedder.save(a.net)
    # (b) the detector; every candidate keeps its hand-check verdict and its learned cosine, so each component's
    # contribution is read off the same run.
    t0 = time.perf_counter()
    matches, cands = run_matching(index, keys, imgs, cfg)
    t_det = time.perf_counter() - t0
    groups: dict = {}
    for c in cands:
        g = groups.setdefault((c["pool_key"], c["eval_id"]), {"hand": False, "cos": c.get("cos"), "dmin": 99,
                                                               "hand_d": 99})
        g["hand"] |= bool(c["passed"])
        g["dmin"] = min(g["dmin"], c["distance"])
        if c["passed"]:  # smallest hash distance at which the hand check passes (candidates come closest first)
            g["hand_d"] = min(g["hand_d"], c["distance"])
    preds = {"phash_r8": base_pred, "stage1": set(groups),
             "hand": {k for k, g in groups.items() if g["hand"]},
             "detector": {(m.pool_key, m.eval_id) for m in matches}}
    cols = COLUMNS if not a.no_learned else [c for c in COLUMNS if c[0] not in ("learned_only", "detector")]
    if not a.no_learned:
        preds["learned_only"] = {k for k, g in groups.items() if g["cos"] >= cfg.min_cos}
    else:
        preds["detector"] = preds["hand"]

    def prf_row(name, ks, pred):
        tp, fp, tw, rec = prf(pred, truth, ks, twins)
        return {"tp": tp, "fp": fp, "twin": tw, "precision": tp / (tp + fp) if tp + fp else float("nan"),
                "recall": rec}

    rows = []
    distractor_keys = [k for k in keys if k.startswith("distractor/")]
    for name in list(augment.TRANSFORMS) + ["ALL"]:
        ks = [k for k in keys if family.get(k) == name] if name != "ALL" else keys
        row = {"transform": name, "n": sum(1 for k in ks if k in truth)}
        for label, _ in cols:
            row[label] = prf_row(name, ks, preds[label])
        rows.append(row)
    dist_fp = {label: prf(preds[label], truth, distractor_keys)[1] for label, _ in cols}
    twin_counts = {label: rows[-1][label]["twin"] for label, _ in cols}
    sweep = []
    if not a.no_learned:
        # Precision/recall over cosine thresholds, learned check alone and on top of the hand check.
        for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
            lo = {k for k, g in groups.items() if g["cos"] >= t}
            both = {k for k in lo if groups[k]["hand"]}
            sweep.append({"min_cos": t, "learned_only": prf_row("ALL", keys, lo), "hand_and_learned":
                          prf_row("ALL", keys, both)})

    # Smaller search radii, read off the same candidates (each group's candidates are checked closest first, so the
    # candidates within a smaller radius are exactly a prefix of them).
    radius_sweep = []
    for r in range(4, cfg.radius + 1, 2):  # pHash distances are even (32 of 64 bits set)
        st = {k for k, g in groups.items() if g["dmin"] <= r}
        hd = {k for k, g in groups.items() if g["hand_d"] <= r}
        row = {"radius": r, "stage1": prf_row("ALL", keys, st), "hand": prf_row("ALL", keys, hd)}
        if not a.no_learned:
            row["detector"] = prf_row("ALL", keys, {k for k in hd if groups[k]["cos"] >= cfg.min_cos})
        radius_sweep.append(row)

    print(f"eval images {len(eval_rows)} (index {len(index.hashes):,} hashes, {t_index:.0f} s); planted "
          f"{len(truth)}; distractors {len(distractor_keys)}; detector {t_det:.0f} s, baseline {t_base:.1f} s\n")
    print("\n".join(table(rows, cols)))
    print(f"\nfalse matches on distractors: {dist_fp}; planted copies matched to an evaluation-set twin of their "
          f"source (not counted as false positives): {twin_counts}")
    for rs in radius_sweep:
        print(f"radius {rs['radius']}: " + " | ".join(f"{c} P {rs[c]['precision']:.3f} R {rs[c]['recall']:.3f}"
                                                      for c in ("stage1", "hand", "detector") if c in rs))
    for sw in sweep:
        lo, hl = sw["learned_only"], sw["hand_and_learned"]
        print(f"min_cos {sw['min_cos']:.2f}: learned only P {lo['precision']:.3f} R {lo['recall']:.3f} | "
              f"hand + learned P {hl['precision']:.3f} R {hl['recall']:.3f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "distractor_false_matches": dist_fp, "twin_matches": twin_counts,
              "eval_internal_pairs": len(twins) // 2, "n_eval": len(eval_rows), "n_distractors": len(distractor_keys),
              "config": cfg.to_dict(), "learned_train_seconds": t_train, "min_cos_sweep": sweep, "radius_sweep": radius_sweep,
              "seconds": {"index": t_index, "twins": t_twins, "detector": t_det}}
    if not a.no_overlap:
        t0 = time.perf_counter()
        full = EvalIndex.from_eval_sets([test])  # the default detector (hashes + hand check)
        pairs = []
        for s in range(0, len(train), 2048):
            ids = list(range(s, min(s + 2048, len(train))))
            m, _ = match_batch(full, [train.ids[i] for i in ids], [train.image(i) for i in ids], hand_cfg)
            pairs += m
        t_ov = time.perf_counter() - t0
        n_ov = len({m.eval_id for m in pairs})
        print(f"\nCIFAR-10 train vs test: {n_ov} of {len(test)} test images ({100 * n_ov / len(test):.2f}%) have a "
              f"near-duplicate in the training set ({len(pairs)} pairs, {t_ov:.0f} s); published (ciFAIR): 3.3%")
        result["cifar10_train_vs_test"] = {"n_test_with_duplicate": n_ov, "rate": n_ov / len(test),
                                           "pairs": len(pairs), "seconds": t_ov}
        sample = [pairs[i] for i in np.random.default_rng(0).choice(len(pairs), min(60, len(pairs)), replace=False)]
        html = ["<!doctype html><meta charset='utf-8'><title>CIFAR-10 train vs test near-duplicates</title>",
                f"<h1>CIFAR-10 train vs test: {n_ov} test images with a near-duplicate</h1>",
                "<p>Random sample of detected pairs (left: test, right: train).</p>"]
        for m in sorted(sample, key=lambda m: int(m.eval_id)):
            html.append(f"<div style='display:inline-block;margin:6px;font-size:11px;text-align:center'>"
                        f"<img src='data:image/png;base64,{_thumb_b64(test.image(int(m.eval_id)))}'>"
                        f"<img src='data:image/png;base64,{_thumb_b64(train.image(int(m.pool_key)))}'><br>"
                        f"test {m.eval_id} / train {m.pool_key}<br>d={m.distance} {m.variant} gncc={m.gncc:.2f}</div>")
        (out / "cifar10_train_test_pairs.html").write_text("\n".join(html))
    (out / "dedup_quality.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
