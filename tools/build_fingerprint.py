"""Fingerprint of one deterministic build of the synthetic web: sha256 of every shard file, the funnel and the
rejected rows per (stage, reason). Used to show that a refactor leaves a build's bytes unchanged:

    python tools/build_fingerprint.py --out /tmp/fp-before.json   # on the old code
    python tools/build_fingerprint.py --out /tmp/fp-after.json    # on the new code; then diff the two

The web is served on a fixed port so that URLs (and so uids) are the same in both runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from pipelines.synthweb import SynthWebServer, generate_web

    try:
        from pipelines.curate import querylist as QL
    except ImportError:
        from pipelines import querylist as QL
    work = Path(args.work or tempfile.mkdtemp(prefix="clipline-fp-"))
    paths = generate_web(work / "web", n_pairs=260, seed=3)
    with SynthWebServer(work / "web", port=args.port) as server:
        server.materialise_url_list()
        captions = pq.read_table(paths["pairs_parquet"], columns=["caption"]).column("caption").to_pylist()
        qlist = QL.from_sources([("wordfreq", QL.wordfreq_unigrams(20_000)),
                                 ("bigram_pmi", QL.pmi_bigrams([c for c in captions if c], min_count=3))])
        QL.save(qlist, str(work / "ql.parquet"))
        web = {"root": work / "web", "pairs": paths["pairs_parquet"], "querylist": work / "ql.parquet"}
        from flows.build import build_dataset
        from tests.conftest import synth_build_config

        out = work / "build"
        summary = build_dataset(synth_build_config(web, out))
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((out / "shards").iterdir()) if p.suffix in (".tar", ".parquet")}
    manifest = json.loads((out / "manifest.json").read_text())
    rejected: dict[str, int] = {}
    for p in sorted((out / "rejected").glob("*.parquet")):
        t = pq.read_table(p, columns=["stage", "reason"])
        for s, r in zip(t.column("stage").to_pylist(), t.column("reason").to_pylist()):
            rejected[f"{s}:{r}"] = rejected.get(f"{s}:{r}", 0) + 1
    result = {"shards": shards, "funnel": manifest["funnel"], "rejected": dict(sorted(rejected.items())),
              "summary_kept": summary["funnel"]["kept"], "work": str(work)}
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps({"n_shards": len(shards), "kept": summary["funnel"]["kept"]}))


if __name__ == "__main__":
    main()
