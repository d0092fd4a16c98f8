"""Bootstrapped CLIP-score filtering on the synthetic web (a data-filtering-network loop, CPU-sized).

1. version 1: a synthetic web (English; the web's 6% noise captions), trained `tiny` for --steps steps;
2. version 2: a noisier web (its own concepts' images, --v2-noise of the web's noise captions -- too short, URL only,
   gibberish -- plus --mismatch of the clean captions replaced by a caption of another concept, the alt-text that
   describes something else); scored with the version-1 model (`clip_train.clip_score.score_dataset`: cosine of
   image and caption with the model's own preprocessing) and filtered with DataComp's rule
   (`clip_score_drops(..., top_fraction=F)`);
3. `tiny` trained on version 2 without and with the filter, same steps, same batch, same seed; zero-shot on version
   2's held-out split.

Reports the fraction of noise captions the filter removed (by kind) and of clean ones it removed, and both zero-shot
numbers. Prints one JSON line.

    .venv/bin/python benchmarks/clip_score_bench.py [--v1-pairs 2000] [--v2-pairs 3000] [--steps 240] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_balance_bench import synth_rows, to_samples, train_and_eval  # noqa: E402

from clip_train.shards import write_shards  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v1-pairs", type=int, default=2000)
    p.add_argument("--v2-pairs", type=int, default=3000)
    p.add_argument("--v2-noise", type=float, default=0.15, help="share of the web's noise captions in version 2")
    p.add_argument("--mismatch", type=float, default=0.2, help="share of version 2's clean captions swapped")
    p.add_argument("--top-fraction", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None)
    args = p.parse_args()

    from clip_train.clip_score import clip_score_drops, read_scores, score_dataset

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clip-score-bench-"))
    t_start = time.perf_counter()
    try:
        v1, web1 = synth_rows(work, args.v1_pairs, seed=11, noise_rate=0.06)
        v2, web2 = synth_rows(work, args.v2_pairs, seed=12, noise_rate=args.v2_noise)
        rng = np.random.default_rng(args.seed)
        clean = [r for r in v2 if not r["noise"]]
        for r in v2:
            r["noise_kind"] = "web noise caption" if r["noise"] else ""
        for i in rng.choice(len(clean), size=int(args.mismatch * len(clean)), replace=False):
            r = clean[int(i)]
            other = clean[int(rng.integers(len(clean)))]
            while other["concept"] == r["concept"]:
                other = clean[int(rng.integers(len(clean)))]
            r["caption"], r["noise"], r["noise_kind"] = other["caption"], True, "mismatched caption"
        write_shards(to_samples(v1), work / "v1" / "shards", samples_per_shard=500)
        write_shards(to_samples(v2), work / "v2" / "shards", samples_per_shard=500)
        (work / "v2" / "manifest.json").write_text("{}")

        r1 = train_and_eval(work / "v1" / "shards", work / "run-v1", f"synth:{web1}", args.steps, args.batch_size, args.seed)
        t0 = time.perf_counter()
        scored = score_dataset(str(work / "run-v1"), str(work / "v2"), batch_size=256)
        score_s = time.perf_counter() - t0
        uids, scores, _ = read_scores(scored["out"])
        drops = clip_score_drops(uids, scores, top_fraction=args.top_fraction)
        by_uid = {r["uid"]: r for r in v2}
        kinds = sorted({r["noise_kind"] for r in v2 if r["noise"]})
        removed = {k: float(np.mean([r["uid"] in drops for r in v2 if r["noise_kind"] == k])) for k in kinds}
        noise_removed = float(np.mean([u in drops for u in uids if by_uid[u]["noise"]]))
        clean_removed = float(np.mean([u in drops for u in uids if not by_uid[u]["noise"]]))
        score_by = {k: float(np.mean([s for u, s in zip(uids, scores) if by_uid[u]["noise_kind"] == k])) for k in kinds + [""]}
        kept = [r for r in v2 if r["uid"] not in drops]
        write_shards(to_samples(kept), work / "v2-filtered" / "shards", samples_per_shard=500)

        spec2 = f"synth:{web2}"
        unfiltered = train_and_eval(work / "v2" / "shards", work / "run-v2", spec2, args.steps, args.batch_size, args.seed)
        filtered = train_and_eval(work / "v2-filtered" / "shards", work / "run-v2-filtered", spec2, args.steps,
                                  args.batch_size, args.seed)
        for r in (r1, unfiltered, filtered):
            r.pop("per_class_recall")
        out = {
            "benchmark": "bootstrapped CLIP-score filter: tiny trained on v1 scores a noisier v2; train v2 with/without",
            "command": "python benchmarks/clip_score_bench.py " + " ".join(sys.argv[1:]),
            "v1_pairs": len(v1), "v1_noise_share": round(float(np.mean([r["noise"] for r in v1])), 3),
            "v2_pairs": len(v2), "v2_noise_share": round(float(np.mean([r["noise"] for r in v2])), 3),
            "v2_noise_by_kind": {k: sum(r["noise_kind"] == k for r in v2) for k in kinds},
            "top_fraction": args.top_fraction, "kept": len(kept),
            "noise_removed": round(noise_removed, 3), "noise_removed_by_kind": {k: round(v, 3) for k, v in removed.items()},
            "clean_removed": round(clean_removed, 3),
            "mean_clip_score_by_kind": {(k or "clean"): round(v, 4) for k, v in score_by.items()},
            "score_s": round(score_s, 1), "model_fingerprint": scored["model_fingerprint"][:16],
            "steps": args.steps, "batch_size": args.batch_size,
            "v1_model_on_v1_heldout": r1, "v2_unfiltered": unfiltered, "v2_filtered": filtered,
            "wall_s": round(time.perf_counter() - t_start, 1), "load_avg_at_end": os.getloadavg(),
        }
        print(json.dumps(out))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
