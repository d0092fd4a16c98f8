"""Benchmark of the curation stage (DirectRunner, one in-memory worker), against the stage as it was before the
vectorised steps and against its own baselines, all in the same run.

Input: the CC3M validation captions from ../shared/data, replicated with deterministic variations to --rows rows
(default 300,000); without ../shared/data, generated captions (template sentences over wordfreq's English words) so
the script still runs. Query list: 500,000 entries (wordfreq unigrams + capitalised unigrams + PMI bigrams of the
captions). Measured:
  stage     the whole curate stage (read, filters, match, dedup, language ID, count, balance, write), each run in a
            fresh child process: CPU seconds (user + system, of that process and any children it waits for) around
            run_curate, and its wall time; --repeats runs, interleaved with the baseline runs, median reported
  baseline  the same stage from the source tree of git revision --baseline-rev (before the vectorised steps),
            extracted with `git archive` and run the same way; its outputs (candidates, rejected rows, entry counts)
            must be byte-identical to the new ones (checked, reported)
  (a)       a bare pyahocorasick scan of the same captions (normalise + iterate the automaton): the issue's reference
  (b)       the language-ID backend alone on exactly the rows that reach it in the stage
  (c)       MetaCLIP's naive matching (a Python loop over all entries) on a sample
  memory    peak RSS of the stage at N and 10N rows (separate processes)
Every rate is rows per CPU-second (one core), so it holds on a busy machine better than wall time; the load average
is recorded next to every run. Usage:
  python benchmarks/curate_bench.py [--rows 300000] [--repeats 3] [--memory-rows 30000] [--out docs/curate_bench.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# The last commit whose curation steps are the per-row ones (before the vectorised steps).
BASELINE_REV = "a97553ef9591f1c3e6920aa97b86a2107b8904bb"


def shared_data() -> Path | None:
    path = Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return path if (path / "captions" / "cc3m-validation.tsv").exists() else None


def cc3m_rows(data: Path) -> list[tuple[str, str]]:
    rows = []
    with open(data / "captions" / "cc3m-validation.tsv", encoding="utf-8") as f:
        for line in f:
            caption, _, url = line.rstrip("\n").partition("\t")
            rows.append((caption, url))
    return rows


def generated_rows(n: int = 15_000, seed: int = 0) -> list[tuple[str, str]]:
    """Caption-like sentences over wordfreq's English words (used when ../shared/data is absent)."""
    import wordfreq

    rng = random.Random(seed)
    words = [w for w in wordfreq.top_n_list("en", 20_000) if w.isalpha()]
    head, tail = words[:300], words[300:]
    templates = ["{a} {n} {p} the {m}", "{a} {n} and {a2} {m} {p} {m2}", "photo of {a} {n}", "the {n} of {m} , {a}",
                 "{n} {p} {m} at night", "{a} {n} on white background", "{n} : {m} {p} the {m2} ."]
    rows = []
    for i in range(n):
        pick = lambda: rng.choice(tail) if rng.random() < 0.4 else rng.choice(head)  # noqa: E731
        caption = rng.choice(templates).format(a=pick(), a2=pick(), n=pick(), m=pick(), m2=pick(),
                                               p=rng.choice(["in", "on", "with", "near", "under", "by"]))
        rows.append((caption, f"http://img{i % 997}.example.com/{i}.jpg"))
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


def make_inputs(work: Path, rows: int, entries: int, files: int = 1):
    """raw*.parquet (``files`` files with the rows in order) and ql.parquet under ``work``; returns a summary."""
    data = shared_data()
    base = cc3m_rows(data) if data else generated_rows()
    table = pa.Table.from_pylist(replicate(base, rows))
    bounds = [round(i * rows / files) for i in range(files + 1)]
    raw = []
    for f in range(files):
        p = work / (f"raw-{f:03d}.parquet" if files > 1 else "raw.parquet")
        pq.write_table(table.slice(bounds[f], bounds[f + 1] - bounds[f]), p)
        raw.append(str(p))
    ql, ql_stats = build_querylist([c for c, _ in base], entries, work / "ql.parquet")
    return {"raw": raw, "querylist": str(work / "ql.parquet"), "captions": "cc3m" if data else "generated",
            "base_rows": len(base), "base": base, "ql": ql, "ql_stats": ql_stats, "table": table}


# ------------------------------------------------------------------------------------- stage runs, one per process

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pipelines.curate.langid import EnglishLexicon
from pipelines.curate.stage import run_curate
from pipelines.curate.steps import CurateParams
spec = json.loads(sys.argv[2])
EnglishLexicon.cached()  # built once per machine (~3 s); not part of the stage's steady-state cost
import pipelines.curate.langid as _langid
getattr(_langid, "_LEXICONS", {}).clear()  # but loading it from that cache is: the stage pays it as before
t, load = os.times(), os.getloadavg()[0]
wall = time.perf_counter()
stats = run_curate(spec["inputs"], spec["querylist"], spec["out"], CurateParams(**spec["params"]), force=True,
                   runner=spec.get("runner", "direct"), workers=spec.get("workers", 1), beam_args=spec.get("beam_args"))
wall = time.perf_counter() - wall
u = os.times()
cpu = (u.user - t.user) + (u.system - t.system) + (u.children_user - t.children_user) \
    + (u.children_system - t.children_system)
print("RESULT " + json.dumps({"cpu_s": cpu, "wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0],
                             "kept": stats["kept"], "rejected": stats["rejected"], "input_rows": stats["input_rows"],
                             "step_seconds": stats["seconds"], "lang_method": stats["lang_method"]}))
"""


def run_stage(tree: Path, inputs: list[str], querylist: str, out: Path, params: dict, **extra) -> dict:
    """The stage of source tree ``tree`` in a fresh child process; CPU and wall time around run_curate."""
    spec = {"inputs": inputs, "querylist": querylist, "out": str(out), "params": params, **extra}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tree), json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=str(tree))
    if res.returncode != 0:
        raise RuntimeError(f"stage run in {tree} failed:\n{res.stderr[-3000:]}")
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def output_digest(out: Path) -> dict[str, str]:
    """sha256 of every output Parquet file (candidates, rejected rows, entry counts), by relative path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.parquet"))}


def baseline_tree(rev: str, dest: Path) -> Path | None:
    """The pipelines/ and schemas/ packages of git revision ``rev``, extracted under ``dest`` (None if git or the
    revision is not available, e.g. in a source tarball)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "pipelines", "schemas"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def load_snapshot() -> dict:
    """Load average and the busiest other processes right now (the machine is shared)."""
    top = []
    try:
        res = subprocess.run(["top", "-bn1", "-w", "200"], capture_output=True, text=True, timeout=10)
        lines = res.stdout.splitlines()
        start = next(i for i, x in enumerate(lines) if x.lstrip().startswith("PID"))
        for x in lines[start + 1:start + 6]:
            f = x.split()
            if len(f) >= 12:
                top.append({"pid": int(f[0]), "cpu_pct": float(f[8]), "command": f[11]})
    except (OSError, StopIteration, ValueError, subprocess.TimeoutExpired):
        pass
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(), "top": top}


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


def summarize(runs: list[dict], rows: int) -> dict:
    cpu = [r["cpu_s"] for r in runs]
    med = statistics.median(cpu)
    return {"runs": len(runs), "cpu_s": [round(x, 2) for x in cpu], "wall_s": [round(r["wall_s"], 2) for r in runs],
            "load_1min": [round(r["load_before"], 2) for r in runs], "cpu_s_median": round(med, 2),
            "pairs_per_cpu_s": round(rows / med), "pairs_per_cpu_s_best": round(rows / min(cpu)),
            "kept": runs[0]["kept"], "rejected": runs[0]["rejected"], "step_seconds": runs[-1]["step_seconds"],
            "lang_method": runs[-1]["lang_method"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each stage variant (interleaved)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the 'before' stage ('' to skip)")
    ap.add_argument("--naive-sample", type=int, default=50)
    ap.add_argument("--memory-rows", type=int, default=30_000, help="N for the N vs 10N peak-RSS check (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (inputs and outputs)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "curate_bench.json"))
    args = ap.parse_args(argv)

    from pipelines.curate.filters import CaptionFilterConfig, check_caption, check_url
    from pipelines.curate.langid import EnglishLexicon, make_backend
    from pipelines.curate.matching import EntryMatcher, naive_match
    from pipelines.curate.text import normalize

    work = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    load_at_start = load_snapshot()
    t0 = time.process_time()
    inp = make_inputs(work, args.rows, args.entries)
    ql, base, rows_table = inp["ql"], inp["base"], inp["table"]
    print(f"inputs: {args.rows:,} rows from {inp['base_rows']:,} {inp['captions']} captions; query list "
          f"{inp['ql_stats']['entries']:,} entries {inp['ql_stats']['by_source']} ({time.process_time() - t0:.1f} s)")
    EnglishLexicon.cached()

    # The stage: new (this tree) and baseline (git revision), default parameters and dedup=none, interleaved.
    old_tree = baseline_tree(args.baseline_rev, work / "baseline_src") if args.baseline_rev else None
    if args.baseline_rev and old_tree is None:
        print(f"baseline {args.baseline_rev}: not available (no git checkout?); measuring the new stage only")
    trees = {"new": ROOT, **({"baseline": old_tree} if old_tree else {})}
    variants = {"default": {"t": 20_000}, "dedup_none": {"t": 20_000, "dedup": "none"}}
    runs: dict = {f"{tree}/{v}": [] for tree in trees for v in variants}
    digests: dict = {}
    for rep in range(args.repeats):
        for v, params in variants.items():
            for tree_name, tree in trees.items():
                out = work / f"out_{tree_name}_{v}"
                r = run_stage(tree, inp["raw"], inp["querylist"], out, params)
                runs[f"{tree_name}/{v}"].append(r)
                print(f"[{rep + 1}/{args.repeats}] {tree_name:8s} {v:10s} cpu {r['cpu_s']:6.2f} s  wall "
                      f"{r['wall_s']:6.2f} s  load {r['load_before']:.1f}  -> "
                      f"{args.rows / r['cpu_s']:,.0f} pairs/CPU-s")
                if rep == 0:
                    digests[f"{tree_name}/{v}"] = output_digest(out)
    identical = {v: digests.get(f"baseline/{v}") == digests[f"new/{v}"] for v in variants} if old_tree else None
    if identical is not None:
        print(f"outputs byte-identical to the baseline: {identical}")

    # (a) bare automaton scan of the same captions (pyahocorasick, as the stage used to match).
    captions = rows_table.column("caption").to_pylist()
    urls = rows_table.column("url").to_pylist()
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for i, e in enumerate(ql.entries):
        automaton.add_word(f" {e} ", i)
    automaton.make_automaton()
    t0 = time.process_time()
    n_hits = 0
    for c in captions:
        for _ in automaton.iter(normalize(c)):
            n_hits += 1
    scan_s = time.process_time() - t0
    matcher = EntryMatcher(ql.entries)
    t0 = time.process_time()
    step = 20_000
    for i in range(0, len(captions), step):
        matcher.match_arrow(rows_table.column("caption").slice(i, step).combine_chunks())
    vec_match_s = time.process_time() - t0

    # (b) the backend alone on exactly the rows that reach it: alive after filters and match, not claimed by the
    # lexicon (dedup removes nothing here: URLs are unique).
    cfg = CaptionFilterConfig()
    lexicon = EnglishLexicon.cached()
    reach = [c for u, c in zip(urls, captions)
             if check_caption(c, cfg) is None and check_url(u) is None and matcher.match(c)
             and not lexicon.is_english(c)]
    backend = make_backend("py3langid")
    t0 = time.process_time()
    detected = backend.detect(reach)
    backend_s = time.process_time() - t0

    # Language ID on the original captions: the backends' English share and speed, and the lexicon shortcut.
    base_caps = [c for c, _ in base]
    t0 = time.process_time()
    py_langs = [lang for lang, _ in backend.detect(base_caps)]
    py_rate = len(base_caps) / (time.process_time() - t0)
    ld = make_backend("langdetect")
    t0 = time.process_time()
    ld_langs = [lang for lang, _ in ld.detect(base_caps[:2000])]
    ld_rate = len(ld_langs) / (time.process_time() - t0)
    lex_fires = [lexicon.is_english(c) for c in base_caps]
    lex_agree = sum(1 for f, lang in zip(lex_fires, py_langs) if f and lang == "en") / max(1, sum(lex_fires))

    # (c) naive matching on a sample.
    sample = captions[: args.naive_sample]
    t0 = time.process_time()
    naive = [naive_match(c, ql.entries) for c in sample]
    naive_s = time.process_time() - t0
    assert naive == [matcher.match(c) for c in sample], "vectorised matcher and naive loop disagree"

    n = args.rows
    new = summarize(runs["new/default"], n)
    result = {
        "rows": n, "captions": inp["captions"], "entries": len(ql), "querylist_sources": inp["ql_stats"]["by_source"],
        "machine": load_at_start, "baseline_rev": args.baseline_rev if old_tree else None,
        "stage": {key: summarize(r, n) for key, r in runs.items()},
        "outputs_identical_to_baseline": identical,
        "a_bare_automaton_scan": {"seconds": round(scan_s, 3), "pairs_per_s": round(n / scan_s), "hits": n_hits},
        "vectorised_match_alone": {"seconds": round(vec_match_s, 3), "pairs_per_s": round(n / vec_match_s)},
        "b_langid_backend_on_reaching_rows": {"rows": len(reach), "seconds": round(backend_s, 3),
                                              "rows_per_s": round(len(reach) / backend_s) if reach else None,
                                              "english_share": round(sum(1 for lg, _ in detected if lg == "en")
                                                                     / max(1, len(detected)), 4)},
        "c_naive": {"sample": len(sample), "seconds": round(naive_s, 3),
                    "pairs_per_s": round(len(sample) / naive_s, 2)},
        "language_id_on_base_captions": {
            "captions": len(base_caps), "py3langid_english_share": round(py_langs.count("en") / len(py_langs), 4),
            "py3langid_rows_per_s": round(py_rate),
            "langdetect_english_share_2000": round(ld_langs.count("en") / max(1, len(ld_langs)), 4),
            "langdetect_rows_per_s": round(ld_rate), "lexicon_fires": round(sum(lex_fires) / len(lex_fires), 4),
            "lexicon_agrees_with_py3langid": round(lex_agree, 4)},
        "stage_vs_bare_scan": round((n / new["cpu_s_median"]) / (n / scan_s), 3),
        "stage_vs_bound_a_plus_b": round((scan_s + backend_s) / new["cpu_s_median"], 3),
        "stage_vs_naive": round((n / new["cpu_s_median"]) / (len(sample) / naive_s), 1),
        "machine_at_end": load_snapshot(),
    }
    if old_tree:
        old = summarize(runs["baseline/default"], n)
        result["speedup_vs_baseline_default"] = round(old["cpu_s_median"] / new["cpu_s_median"], 2)
        result["speedup_vs_baseline_dedup_none"] = round(
            summarize(runs["baseline/dedup_none"], n)["cpu_s_median"] / summarize(runs["new/dedup_none"], n)[
                "cpu_s_median"], 2)
    if args.memory_rows:
        small, large = args.memory_rows, 10 * args.memory_rows
        for m in (small, large):
            pq.write_table(pa.Table.from_pylist(replicate(base, m, seed=1)), work / f"mem_{m}.parquet")
        rss_small, rss_large = (peak_rss_of(m, work, work / "ql.parquet") for m in (small, large))
        result["peak_rss_mib"] = {str(small): round(rss_small), str(large): round(rss_large),
                                  "ratio_10x_rows": round(rss_large / rss_small, 3)}
    finish(result, args, work, hide="stage")


def finish(result: dict, args, work: Path, hide: str) -> None:
    """Print the result (without its ``hide`` key), write it to ``args.out``, remove the work dir unless --keep."""
    print(json.dumps({k: v for k, v in result.items() if k != hide}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.out}" + (f"; work directory {work}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
