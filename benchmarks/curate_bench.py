"""Benchmark of the curation stage on real captions, with its baselines measured in the same run.

Input: the CC3M validation captions from ../shared/data, replicated with deterministic variations to --rows rows
(default 200,000), and a 500,000-entry query list (wordfreq unigrams + capitalised unigrams + PMI bigrams from the
captions). Measured, each on one core:
  stage   the whole curate stage (read, filters, match, dedup, language ID, count, balance, write) on Beam's
          DirectRunner, one worker
  (a)     a bare pyahocorasick scan of the same captions (normalise + iterate the automaton)
  (b)     the language-ID backend alone on exactly the rows that reach it in the stage
  (c)     MetaCLIP's naive matching (a Python loop of `" "+entry+" " in text` over all entries) on a sample
and the peak RSS of the stage at N and 10N rows (separate processes). Every rate is rows per CPU-second of this
process (the stage runs on one in-process DirectRunner worker), so the numbers hold on a busy machine. Usage:
  python benchmarks/curate_bench.py [--rows 200000] [--memory-rows 50000] [--out docs/curate_bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def shared_data() -> Path:
    path = Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "captions" / "cc3m-validation.tsv").exists():
        sys.exit(f"needs {path}/captions/cc3m-validation.tsv (../shared/data)")
    return path


def cc3m_rows(data: Path) -> list[tuple[str, str]]:
    rows = []
    with open(data / "captions" / "cc3m-validation.tsv", encoding="utf-8") as f:
        for line in f:
            caption, _, url = line.rstrip("\n").partition("\t")
            rows.append((caption, url))
    return rows


PREFIXES = ["", "", "photo of ", "image : ", "stock photo : ", "the ", "a picture of "]
SUFFIXES = ["", "", " .", " in the city", " at night", " , vector illustration", " on white background"]


def replicate(rows, n, seed=0):
    """Deterministic variations of real captions (prefix/suffix phrases, dropped words) with unique URLs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        caption, url = rows[i % len(rows)]
        k = i // len(rows)
        if k:
            words = caption.split()
            if len(words) > 4 and rng.random() < 0.3:
                del words[rng.randrange(len(words))]
            caption = rng.choice(PREFIXES) + " ".join(words) + rng.choice(SUFFIXES)
        out.append({"url": f"{url}?r={k}", "caption": caption})
    return out


def build_querylist(captions, size, path):
    from pipelines.curate import querylist as QL

    unigrams = QL.wordfreq_unigrams(None)
    bigrams = QL.pmi_bigrams(captions, min_count=5, min_pmi=2.0)
    n_cap = max(0, size - len(unigrams) - len(bigrams))
    ql = QL.from_sources([("wordfreq", unigrams), ("bigram_pmi", bigrams),
                          ("wordfreq_capitalized", QL.capitalized(unigrams, n_cap + 5000))])
    ql = QL.QueryList(ql.entries[:size], ql.sources[:size])
    QL.save(ql, str(path))
    return ql, QL.stats(ql)


def peak_rss_of(rows: int, workdir: Path, ql_path: Path) -> float:
    """Peak RSS (MiB) of a fresh process running the stage on `rows` rows."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
from pipelines.curate.stage import run_curate
from pipelines.curate.steps import CurateParams
run_curate([{str(workdir / f'mem_{rows}.parquet')!r}], {str(ql_path)!r}, {str(workdir / f'mem_out_{rows}')!r},
           CurateParams(t=20000), force=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--naive-sample", type=int, default=100)
    ap.add_argument("--memory-rows", type=int, default=50_000, help="N for the N vs 10N peak-RSS check (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "curate_bench.json"))
    args = ap.parse_args(argv)

    from pipelines.curate.stage import run_curate
    from pipelines.curate.steps import CurateParams
    from pipelines.curate.filters import CaptionFilterConfig, check_caption, check_url
    from pipelines.curate.langid import EnglishLexicon, make_backend
    from pipelines.curate.matching import EntryMatcher, naive_match
    from pipelines.curate.text import normalize

    data = shared_data()
    work = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    base = cc3m_rows(data)
    rows = replicate(base, args.rows)
    pq.write_table(pa.Table.from_pylist(rows), work / "raw.parquet")
    captions = [r["caption"] for r in rows]
    t0 = time.process_time()
    ql, ql_stats = build_querylist([c for c, _ in base], args.entries, work / "ql.parquet")
    print(f"query list: {ql_stats['entries']:,} entries {ql_stats['by_source']} ({time.process_time() - t0:.1f} s)")

    # The stage, one DirectRunner worker in this process.
    EnglishLexicon.cached()  # built once per machine; not part of the stage's steady-state cost
    cpu0, t0 = time.process_time(), time.perf_counter()
    stats = run_curate([str(work / "raw.parquet")], str(work / "ql.parquet"), str(work / "out"),
                       CurateParams(t=20_000), force=True)
    stage_wall, stage_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"stage: {args.rows:,} rows in {stage_wall:.1f} s wall, {stage_cpu:.1f} s CPU; funnel {stats['rejected']}, "
          f"kept {stats['kept']:,}; step seconds {stats['seconds']}; language methods {stats['lang_method']}")

    # (a) bare automaton scan of the same captions.
    matcher = EntryMatcher(ql.entries)
    automaton_iter = matcher._automaton.iter
    t0 = time.process_time()
    n_hits = 0
    for c in captions:
        for _ in automaton_iter(normalize(c)):
            n_hits += 1
    scan_s = time.process_time() - t0

    # (b) the backend alone on exactly the rows that reach it: alive after filters and match, not claimed by the
    # lexicon (dedup removes nothing here: URLs are unique).
    cfg = CaptionFilterConfig()
    lexicon = EnglishLexicon.cached()
    reach = [c for r, c in zip(rows, captions)
             if check_caption(c, cfg) is None and check_url(r["url"]) is None and matcher.match(c)
             and not lexicon.is_english(c)]
    backend = make_backend("py3langid")
    t0 = time.process_time()
    detected = backend.detect(reach)
    backend_s = time.process_time() - t0
    all_backend_sample = captions[:20_000]
    t0 = time.process_time()
    backend.detect(all_backend_sample)
    backend_rate_all = len(all_backend_sample) / (time.process_time() - t0)
    ld = make_backend("langdetect")
    t0 = time.process_time()
    ld_out = ld.detect(captions[:2000])
    langdetect_rate = 2000 / (time.process_time() - t0)

    # (c) naive matching on a sample.
    sample = captions[: args.naive_sample]
    t0 = time.process_time()
    naive = [naive_match(c, ql.entries) for c in sample]
    naive_s = time.process_time() - t0
    assert naive == [matcher.match(c) for c in sample], "automaton and naive loop disagree"

    # Language agreement on the original CC3M captions.
    base_caps = [c for c, _ in base]
    py_langs = [lang for lang, _ in backend.detect(base_caps)]
    lex_fires = [lexicon.is_english(c) for c in base_caps]
    lex_agree = sum(1 for f, lang in zip(lex_fires, py_langs) if f and lang == "en") / max(1, sum(lex_fires))

    n = args.rows
    bound_s = scan_s + backend_s
    result = {
        "rows": n, "entries": len(ql), "querylist_sources": ql_stats["by_source"],
        "stage": {"wall_s": round(stage_wall, 2), "cpu_s": round(stage_cpu, 2),
                  "pairs_per_s_per_core": round(n / stage_cpu),
                  "kept": stats["kept"], "rejected": stats["rejected"], "step_seconds": stats["seconds"],
                  "lang_method": stats["lang_method"]},
        "a_bare_scan": {"seconds": round(scan_s, 3), "pairs_per_s": round(n / scan_s)},
        "b_langid_backend_on_reaching_rows": {"rows": len(reach), "seconds": round(backend_s, 3),
                                              "rows_per_s": round(len(reach) / backend_s) if reach else None,
                                              "english_share": round(sum(1 for lg, _ in detected if lg == "en")
                                                                     / max(1, len(detected)), 4)},
        "py3langid_rows_per_s_any_caption": round(backend_rate_all),
        "langdetect_rows_per_s": round(langdetect_rate),
        "langdetect_english_share_2000": round(sum(1 for lg, _ in ld_out if lg == "en") / 2000, 4),
        "c_naive": {"sample": len(sample), "seconds": round(naive_s, 3), "pairs_per_s": round(len(sample) / naive_s, 2)},
        "bound_a_plus_b_s": round(bound_s, 3),
        "stage_vs_bound": round(bound_s / stage_cpu, 3),
        "stage_vs_naive": round((n / stage_cpu) / (len(sample) / naive_s), 1),
        "cc3m_py3langid_english_share": round(py_langs.count("en") / len(py_langs), 4),
        "cc3m_lexicon_fires": round(sum(lex_fires) / len(lex_fires), 4),
        "cc3m_lexicon_agrees_with_py3langid": round(lex_agree, 4),
        "cores": os.cpu_count(),
    }
    if args.memory_rows:
        small, large = args.memory_rows, 10 * args.memory_rows
        for m in (small, large):
            pq.write_table(pa.Table.from_pylist(replicate(base, m, seed=1)), work / f"mem_{m}.parquet")
        rss_small, rss_large = peak_rss_of(small, work, work / "ql.parquet"), peak_rss_of(large, work,
                                                                                       work / "ql.parquet")
        result["peak_rss_mib"] = {str(small): round(rss_small), str(large): round(rss_large),
                                  "ratio_10x_rows": round(rss_large / rss_small, 3)}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.out}; inputs under {work}")



if __name__ == "__main__":
    main()
