"""The ``clipline`` command: one entry point for every stage, flow and report.

User mistakes (a missing file, a bad column, an unknown eval-set spec...) end with one line on stderr and exit
code 2, never a stack trace; bugs still raise.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")


class _DropNoise(logging.Filter):
    """Beam logs an 'apitools not found' warning at import on every machine without GCP libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropNoise())

app = typer.Typer(help="clipline: curate, crawl, shard, decontaminate, train and evaluate CLIP-style datasets.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
querylist_app = typer.Typer(help="Build and inspect query lists (the metadata entries captions are matched to).",
                            no_args_is_help=True)
app.add_typer(querylist_app, name="querylist")

from flows.cli_errors import fail as _fail, run_user as _run_user  # noqa: E402
from flows.cli_model import register as register_model_commands  # noqa: E402 - export, score

register_model_commands(app)


# ---------------------------------------------------------------------------------------------- querylist


@querylist_app.command("build")
def querylist_build(
    out: Path = typer.Option(..., "--out", help="Query list Parquet to write (entry_id, entry, source)."),
    wordfreq: int = typer.Option(0, help="Top-N English unigrams from wordfreq's 'large' list (0: none; -1: all)."),
    wordfreq_capitalized: int = typer.Option(0, help="Capitalised forms of the top-N unigrams (matching is "
                                                     "case-sensitive)."),
    wordnet: Optional[Path] = typer.Option(None, help="WordNet database directory (index.noun ...), e.g. "
                                                      "/usr/share/wordnet."),
    bigrams_from: list[str] = typer.Option([], help="Caption file(s) to mine high-PMI bigrams from (any input "
                                                    "format of `curate`)."),
    caption_col: str = typer.Option("caption", help="Caption column of --bigrams-from files."),
    columns: Optional[str] = typer.Option(None, help="Header-less CSV/TSV column names, comma-separated."),
    bigram_min_count: int = typer.Option(5, help="Minimum bigram count."),
    bigram_min_pmi: float = typer.Option(3.0, help="Minimum PMI (natural log)."),
    bigram_top: int = typer.Option(0, help="Keep at most this many bigrams (0: all passing)."),
    terms: list[Path] = typer.Option([], help="User term list(s): UTF-8, one entry per line."),
):
    """Build a versioned query list from offline sources and print how many entries each gave."""
    from pipelines.curate import querylist as QL

    def build():
        sources = []
        for path in terms:
            sources.append((f"user:{path.name}", QL.read_term_file(str(path))))
        if wordnet:
            sources.append(("wordnet", QL.wordnet_lemmas(str(wordnet))))
        unigrams = QL.wordfreq_unigrams(None if wordfreq < 0 else max(wordfreq, wordfreq_capitalized)) \
            if (wordfreq or wordfreq_capitalized) else []
        if wordfreq:
            sources.append(("wordfreq", unigrams if wordfreq < 0 else unigrams[:wordfreq]))
        if wordfreq_capitalized:
            sources.append(("wordfreq_capitalized", QL.capitalized(unigrams, wordfreq_capitalized)))
        if bigrams_from:
            sources.append(("bigram_pmi", QL.pmi_bigrams(_iter_captions(bigrams_from, caption_col, columns),
                                                         min_count=bigram_min_count, min_pmi=bigram_min_pmi,
                                                         top_k=bigram_top or None)))
        if not sources:
            raise QL.QueryListError("no source given: use --wordfreq, --wordfreq-capitalized, --wordnet, "
                                    "--bigrams-from or --terms")
        qlist = QL.from_sources(sources)
        QL.save(qlist, str(out))
        return qlist, {name: len(items) for name, items in sources}

    qlist, offered = _run_user(build)
    stats = QL.stats(qlist)
    typer.echo(f"wrote {out}: {len(qlist)} entries, sha256 {qlist.content_hash[:16]}")
    for name, n in offered.items():
        typer.echo(f"  {name:<24} offered {n:>8}  new {stats['by_source'].get(name, 0):>8}")


def _iter_captions(patterns, caption_col, columns):
    from pipelines.curate.readers import read_batches, resolve_inputs

    cols = columns.split(",") if columns else None
    url_col = "url" if not cols or "url" in cols else cols[0]
    for inp in resolve_inputs(patterns, url_col=url_col, caption_col=caption_col, columns=cols):
        for batch in read_batches(inp):
            yield from (c for c in batch.captions if c)


@querylist_app.command("stats")
def querylist_stats(path: str = typer.Argument(..., help="Query list (Parquet or text, local or s3://)."),
                    as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Entries per source, words per entry, lengths and the content hash of any query list."""
    from pipelines.curate import querylist as QL

    qlist = _run_user(QL.load, path)
    stats = QL.stats(qlist)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    typer.echo(f"{path}: {stats['entries']} entries, sha256 {stats['sha256']}")
    for name, n in stats["by_source"].items():
        typer.echo(f"  source {name:<24} {n:>9}")
    typer.echo("  words per entry: " + ", ".join(f"{k}: {v}" for k, v in stats["by_words"].items()))
    typer.echo(f"  characters: min {stats['chars']['min']}, median {stats['chars']['median']}, "
               f"max {stats['chars']['max']}")
    if stats["with_punctuation"]:
        typer.echo(f"  note: {stats['with_punctuation']} entries contain , . ; : ? ! or ` and can never match "
                   f"(MetaCLIP spacing splits them)")


# ---------------------------------------------------------------------------------------------- curate


@app.command()
def curate(
    input: list[str] = typer.Option(..., "--input", "-i", help="Input file(s), glob(s) or directories: Parquet, "
                                                               "CSV, TSV, JSONL (optionally .gz), local or s3://."),
    querylist: str = typer.Option(..., "--querylist", "-q", help="Query list: Parquet or text (one entry/line)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (local or s3://bucket/prefix)."),
    url_col: str = typer.Option("url", help="URL column name."),
    caption_col: str = typer.Option("caption", help="Caption column name."),
    columns: Optional[str] = typer.Option(None, help="Names of header-less CSV/TSV columns, comma-separated "
                                                     "(e.g. caption,url for CC3M's TSV)."),
    format: Optional[str] = typer.Option(None, "--format", help="parquet|csv|tsv|jsonl (default: from the content)."),
    t: Optional[float] = typer.Option(None, "--t", help="Balancing threshold t (default 20000)."),
    target_size: Optional[int] = typer.Option(None, help="Find t so that the expected kept count is this."),
    no_balance: bool = typer.Option(False, help="Keep every candidate (keep_prob is still stored)."),
    seed: int = typer.Option(0, help="Seed of the per-uid balancing draw."),
    langs: str = typer.Option("en", help="Languages to keep, comma-separated ('' keeps all)."),
    min_lang_score: float = typer.Option(0.0, help="Minimum language score."),
    lang_backend: str = typer.Option("py3langid", help="py3langid (fast) or langdetect."),
    no_lexicon: bool = typer.Option(False, help="Disable the English-lexicon shortcut of language ID."),
    dedup: str = typer.Option("url", help="url | url_caption | none."),
    min_words: int = typer.Option(2), min_chars: int = typer.Option(5),
    max_chars: int = typer.Option(1000), max_words: int = typer.Option(200),
    batch_rows: int = typer.Option(20_000, help="Rows per batch (and per output file)."),
    workers: int = typer.Option(1, help="DirectRunner workers (>1: multi_processing)."),
    runner: str = typer.Option("direct", help="Beam runner: direct, dask, dataflow, flink, spark (or a class "
                                              "path); its options via --beam-arg."),
    beam_arg: list[str] = typer.Option([], help="Extra Beam pipeline option, e.g. "
                                                "--beam-arg=--dask_client_address=tcp://127.0.0.1:8786."),
    force: bool = typer.Option(False, help="Recompute even if a finished output with the same parameters exists."),
):
    """Match raw (url, caption) lists against a query list, filter, balance, and write candidates."""
    from pipelines.core.beam import resolve_runner
    from pipelines.curate.stage import run_curate
    from pipelines.curate.steps import CurateParams

    if t is not None and target_size is not None:
        _fail("give --t or --target-size, not both")
    if workers < 1:
        _fail(f"--workers must be >= 1, got {workers}")
    runner = _run_user(resolve_runner, runner)
    params = _run_user(CurateParams, min_words=min_words, min_chars=min_chars, max_chars=max_chars,
                       max_words=max_words, dedup=dedup, langs=tuple(x for x in langs.split(",") if x),
                       min_lang_score=min_lang_score, lang_backend=lang_backend, lexicon_shortcut=not no_lexicon,
                       t=t if t is not None else (None if target_size else 20_000), target_size=target_size,
                       balance=not no_balance, seed=seed, batch_rows=batch_rows)
    stats = _run_user(run_curate, input, querylist, out, params, url_col=url_col, caption_col=caption_col,
                      fmt=format, columns=columns.split(",") if columns else None, runner=runner, workers=workers,
                      beam_args=beam_arg, force=force)
    print_funnel(stats, out)


def print_funnel(stats: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"curation funnel ({'reused' if stats.get('reused') else 'computed'})")
    table.add_column("step")
    table.add_column("rows in", justify="right")
    table.add_column("rows out", justify="right")
    for step in stats["steps"]:
        table.add_row(step["step"], f"{step['rows_in']:,}", f"{step['rows_out']:,}")
    console.print(table)
    reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(stats["rejected"].items(), key=lambda kv: -kv[1]))
    console.print(f"input {stats['input_rows']:,} = kept {stats['kept']:,} + rejected "
                  f"{sum(stats['rejected'].values()):,} ({reasons})")
    console.print(f"t = {stats['balance']['t']:.1f}; entries matched {stats['balance']['entries_matched']:,}, "
                  f"at or over t {stats['balance']['entries_at_or_over_t']:,}")
    console.print(f"outputs: {out}/candidates/, {out}/rejected/, {out}/entry_counts.parquet, {out}/stats.json")


# ---------------------------------------------------------------------------------------------- build


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the flag was typed on the command line (not a default): flags win over --config, which wins
    over the defaults."""
    source = ctx.get_parameter_source(name)  # an enum of click's (typer may vendor its own click: compare names)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


@app.command()
def build(
    ctx: typer.Context,
    input: Optional[list[str]] = typer.Option(None, "--input", "-i", help="Raw URL list(s): Parquet/CSV/TSV/JSONL, "
                                                                         "local or s3://."),
    querylist: Optional[str] = typer.Option(None, "--querylist", "-q", help="Query list (Parquet or text)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Build directory (local or s3://bucket/prefix)."),
    work: Optional[str] = typer.Option(None, help="Where intermediate stages live (default: OUT itself)."),
    allow_cidr: list[str] = typer.Option([], help="Address range the crawler may reach although private, e.g. "
                                                  "127.0.0.1/32 for a local server (repeatable)."),
    eval_set: list[str] = typer.Option([], help="Evaluation set to decontaminate against, e.g. cifar10:PATH, "
                                                "digits, folder:PATH, wds:GLOB, synth:PATH (repeatable)."),
    t: Optional[float] = typer.Option(None, "--t", help="Balancing threshold t (default 20000)."),
    target_size: Optional[int] = typer.Option(None, help="Find t so the expected kept count is this."),
    samples_per_shard: int = typer.Option(1000, help="Samples per output shard."),
    seed: int = typer.Option(0, help="Seed of every draw and of the shard order."),
    url_col: str = typer.Option("url"), caption_col: str = typer.Option("caption"),
    columns: Optional[str] = typer.Option(None, help="Names of header-less CSV/TSV columns, comma-separated."),
    langs: str = typer.Option("en", help="Languages to keep ('' keeps all)."),
    image_size: int = typer.Option(256, help="Longest side of the stored images."),
    processes: int = typer.Option(1, help="img2dataset processes."),
    threads: int = typer.Option(32, help="img2dataset download threads per process."),
    timeout: float = typer.Option(10.0, help="Seconds per socket operation of a download."),
    runner: str = typer.Option("direct", help="Beam runner of the data-plane stages: direct, dask, dataflow, "
                                              "flink, spark (or a class path)."),
    beam_arg: list[str] = typer.Option([], help="Extra Beam pipeline option (repeatable)."),
    config: Optional[Path] = typer.Option(None, help="YAML with BuildConfig fields; flags given on the command "
                                                     "line win over it."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective config (defaults < "
                                                                    "--config < flags) as YAML and stop."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset root: build a new version "
                                                                 "ROOT/versions/NNNN doing only new work (no --out)."),
    rebuild_latest: bool = typer.Option(False, "--rebuild-latest", help="With --dataset: a new version of the "
                                                                        "latest data without the recorded takedowns."),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="With --dataset: the build's clock for crawl "
                                                              "retries (ISO 8601, UTC; default now)."),
    verbose: bool = typer.Option(False, "--verbose", help="Also stream img2dataset's and the crawl workers' log."),
    filter_spec: Optional[str] = typer.Option(None, "--filter", help="CLIP-score filter after decontamination: "
                                              "clip_score:threshold=X (drop cosine < X) or clip_score:top_fraction=F "
                                              "(keep the best F); needs --filter-checkpoint."),
    filter_checkpoint: Optional[str] = typer.Option(None, "--filter-checkpoint", help="Model that scores: a clipline "
                                                    "run directory, an open_clip or an OpenAI checkpoint."),
):
    """Build a dataset: curate -> crawl -> image checks -> decontaminate -> [CLIP-score filter] -> rebalance -> shard
    (a Prefect flow)."""
    from flows.build import build_dataset
    from flows.config import load_build_config

    if t is not None and target_size is not None:
        _fail("give --t or --target-size, not both")
    flags: dict = {}

    def put(path: str, value, name: str) -> None:
        if _given(ctx, name):
            node = flags
            *parents, leaf = path.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value

    put("inputs", list(input or []), "input")
    put("querylist", querylist, "querylist")
    put("out", out, "out")
    put("work", work, "work")
    put("crawl.allow_cidrs", list(allow_cidr), "allow_cidr")
    put("decontam.eval_sets", list(eval_set), "eval_set")
    put("curate.t", t, "t")
    put("balance.t", t, "t")
    put("curate.target_size", target_size, "target_size")
    put("balance.target_size", target_size, "target_size")
    if _given(ctx, "target_size"):
        flags["curate"]["t"] = None
    put("shard.samples_per_shard", samples_per_shard, "samples_per_shard")
    for path in ("curate.seed", "balance.seed", "shard.seed"):
        put(path, seed, "seed")
    put("url_col", url_col, "url_col")
    put("caption_col", caption_col, "caption_col")
    put("columns", columns.split(",") if columns else None, "columns")
    put("curate.langs", [x for x in langs.split(",") if x], "langs")
    put("crawl.image_size", image_size, "image_size")
    put("crawl.processes", processes, "processes")
    put("crawl.thread_count", threads, "threads")
    put("crawl.timeout", timeout, "timeout")
    put("runner", runner, "runner")
    put("beam_args", list(beam_arg), "beam_arg")
    if filter_spec is not None:
        from clip_train.clip_score import parse_clip_score_filter

        rule = _run_user(parse_clip_score_filter, filter_spec)
        flags["clip_filter"] = {"threshold": None, "top_fraction": None, **rule}
    put("clip_filter.checkpoint", filter_checkpoint, "filter_checkpoint")
    if dataset is not None:  # a dataset version (flows/versions.py)
        from flows.cli_versions import build_dataset_version

        build_dataset_version(dataset, config, flags, rebuild_latest=rebuild_latest, as_of=as_of,
                              print_config=print_config)
        return
    if rebuild_latest or as_of is not None:
        _fail("--rebuild-latest and --as-of need --dataset ROOT")
    cfg = _run_user(load_build_config, config, flags)
    if print_config:
        import yaml

        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
        return
    _preflight(cfg)
    summary = _run_user(build_dataset, cfg, verbose=verbose)
    print_build_summary(summary)


def _preflight(cfg) -> None:
    """Catch user mistakes before a flow run starts (inputs, query list, eval-set specs)."""
    from pipelines.curate import querylist as QL
    from pipelines.curate.readers import resolve_inputs

    _run_user(resolve_inputs, list(cfg.inputs), url_col=cfg.url_col, caption_col=cfg.caption_col,
              columns=list(cfg.columns) if cfg.columns else None)
    _run_user(QL.load, cfg.querylist)
    if cfg.decontam.eval_sets:
        from pipelines.evalsets import parse_spec

        for spec in cfg.decontam.eval_sets:
            _run_user(parse_spec, spec)
    if cfg.clip_filter is not None:
        from clip_train.filter_stage import checkpoint_fingerprint

        _run_user(checkpoint_fingerprint, cfg.clip_filter.checkpoint)


def print_build_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    funnel = summary["funnel"]
    table = Table(title="build funnel")
    for col in ("stage", "rows in", "rows out"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage in funnel.get("order") or list(funnel["stages"]):
        io_ = funnel["stages"][stage]
        table.add_row(stage, f"{io_['in']:,}", f"{io_['out']:,}")
    console.print(table)
    by_reason = sorted(funnel["rejected"].items(), key=lambda kv: -kv[1])
    console.print("rejected: " + ", ".join(f"{k} {v:,}" for k, v in by_reason))
    console.print(f"input rows {funnel['input_rows']:,} = {funnel['kept']:,} in shards + "
                  f"{sum(funnel['rejected'].values()):,} rejected")
    _print_balancing(console, summary["manifest"])
    root = summary["shards_dir"].rsplit("/", 1)[0]
    console.print(f"{summary['n_shards']} shard(s) in {summary['shards_dir']}/; manifest {summary['manifest']}; "
                  f"rejected rows in {root}/rejected/")


def _print_balancing(console, manifest_uri: str) -> None:
    """One line: the share of head and tail entries' matches that reached the shards (MetaCLIP's flattening)."""
    from flows.report.html import head_tail_kept
    from pipelines.core import storage

    m = storage.read_json(manifest_uri)
    counts, t = m.get("entry_counts", {}), m.get("balance", {}).get("t")
    if not t or not counts.get("matched"):
        return
    parts = [f"{name.split()[0]} ({n:,} entries) {b:,} matches -> {a:,} published ({100 * a / b:.1f}%)"
             for name, n, b, a in head_tail_kept(counts["matched"], counts["after"], float(t))]
    console.print(f"balancing t = {float(t):g}: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------- audit, train, eval

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def audit(ctx: typer.Context):
    """Contamination audit: --dataset D --eval-set SPEC... --out DIR [--checkpoint RUN_DIR] (--help for all)."""
    from pipelines.decontam.audit import main as audit_main

    code = _run_user(audit_main, list(ctx.args))
    raise typer.Exit(code or 0)


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context):
    """Train a CLIP model: --data SHARDS --model NAME --out RUN_DIR [...] (--help for all options)."""
    from clip_train.train import main as train_main

    raise typer.Exit(_run_user(train_main, list(ctx.args)) or 0)


@app.command("eval", context_settings=_PASSTHROUGH, add_help_option=False)
def evaluate(ctx: typer.Context):
    """Evaluate a checkpoint: --checkpoint RUN_DIR --eval-set SPEC... --out DIR [...] (--help for all)."""
    from clip_train.evaluate import main as eval_main

    raise typer.Exit(_run_user(eval_main, list(ctx.args)) or 0)


# ---------------------------------------------------------------------------------------------- synthweb & demo


@app.command()
def synthweb(out: Path = typer.Option(..., "--out", help="Directory of the synthetic web."),
             n_pairs: int = typer.Option(2000, help="Image-text pairs to generate."),
             seed: int = typer.Option(0), serve: bool = typer.Option(False, help="Serve it on 127.0.0.1 until Ctrl-C."),
             port: int = typer.Option(8000, help="Port for --serve."),
             backgrounds: str = typer.Option("flat", help="Web pictures on a flat tint (look-alikes per concept) or "
                                                          "'room': a shaded room each (distinct to pHash).")):
    """Generate the synthetic web (drawn images, multilingual captions, failure modes, held-out split)."""
    from pipelines.synthweb import SynthWebServer, synthweb_main

    try:
        paths = synthweb_main(out, n_pairs=n_pairs, seed=seed, backgrounds=backgrounds)
    except ValueError as exc:
        _fail(f"synthweb: {exc}")
    for k, v in paths.items():
        typer.echo(f"{k:>14}: {v}")
    if serve:
        import time

        with SynthWebServer(out, port=port) as web:
            web.materialise_url_list()
            typer.echo(f"serving on {web.base_url} (URL list rewritten to it); Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Where the demo writes everything."),
         n_pairs: int = typer.Option(4000, help="Pairs in the synthetic web."),
         t: float = typer.Option(10, "--t", help="Balancing threshold t: the demo web matches ~2,000 pairs to "
                                                  "~150 entries, so t = 10 cuts the head entries and keeps the tail."),
         samples_per_shard: int = typer.Option(500), seed: int = typer.Option(0),
         steps: int = typer.Option(400, help="Training steps of the tiny CLIP (0: build only)."),
         batch_size: int = typer.Option(64, help="Training batch size.")):
    """The end-to-end run on the synthetic web: build -> audit -> train -> evaluate -> report."""
    from flows.build import build_dataset
    from flows.demo import demo_build_config, demo_e2e_config, first_url, prepare_web, start_over_if_moved
    from pipelines.synthweb import SynthWebServer

    out.mkdir(parents=True, exist_ok=True)
    web = prepare_web(out, n_pairs, seed)
    with SynthWebServer(web["root"]) as server:
        before = first_url(web["pairs_parquet"])
        server.materialise_url_list()
        if start_over_if_moved(out, before, first_url(web["pairs_parquet"])):
            typer.echo(f"the demo web's address changed since the last run ({before.split('/')[2]} -> "
                       f"{server.base_url.split('/')[2]}): starting {out}'s build, audit, training and report over")
        if steps <= 0:
            summary = build_dataset(demo_build_config(out, web, t=t, samples_per_shard=samples_per_shard, seed=seed))
            print_build_summary(summary)
            return
        from flows.e2e import end_to_end

        result = end_to_end(demo_e2e_config(out, web, t=t, samples_per_shard=samples_per_shard, seed=seed,
                                            steps=steps, batch_size=batch_size))
    print_build_summary(result["build"])
    print_eval_summary(result["evaluation"])
    typer.echo(f"report: {result['report']}")


@app.command()
def e2e(config: Path = typer.Option(..., "--config", help="End-to-end YAML (see infra/e2e.example.yaml).")):
    """Raw URLs -> dataset -> audit -> trained CLIP -> evaluation -> report, from one YAML file."""
    import dataclasses

    from flows.e2e import EndToEndConfig, end_to_end

    try:
        cfg = EndToEndConfig.from_yaml(config)
    except (OSError, ValueError, TypeError) as exc:
        _fail(str(exc).splitlines()[0])
    _preflight(_build_cfg_of(cfg))
    result = _run_user(end_to_end, dataclasses.asdict(cfg))
    print_build_summary(result["build"])
    print_eval_summary(result["evaluation"])
    typer.echo(f"report: {result['report']}")


def _build_cfg_of(cfg):
    from flows.e2e import build_config_from

    try:
        return build_config_from(cfg)
    except TypeError as exc:
        _fail(f"build section: {exc}")
    except Exception as exc:  # noqa: BLE001 - a ClipError becomes one line; anything else is a bug
        from pipelines.core.errors import ClipError

        if not isinstance(exc, ClipError):
            raise
        _fail(f"build section: {str(exc).splitlines()[0]}")


def print_eval_summary(evaluation: dict) -> None:
    for name, r in evaluation.get("eval_sets", {}).items():
        extra = f", linear probe {100 * r['linear_probe_top1']:.1f}%" if r.get("linear_probe_top1") is not None else ""
        typer.echo(f"{name}: zero-shot top-1 {100 * r['zeroshot_top1']:.1f}%, top-5 {100 * r['zeroshot_top5']:.1f}%, "
                   f"mean per-class recall {100 * r['mean_per_class_recall']:.1f}% (n = {r['n']}){extra}")


# ---------------------------------------------------------------------------------------------- serve


@app.command()
def serve(config: Path = typer.Option(Path("infra/prefect/local.yaml"), help="Deployments to serve."),
          synthweb_root: Optional[Path] = typer.Option(None, "--synthweb", help="Also serve this synthetic web on "
                                                                                 "127.0.0.1 (for demo deployments)."),
          limit: Optional[int] = typer.Option(None, help="Most flow runs at once."),
          server: Optional[str] = typer.Option(None, "--server", help="Prefect server to create the deployments on "
                                                                      "and report runs to (http://HOST:4200); "
                                                                      "default: PREFECT_API_URL, else a temporary "
                                                                      "local server.")):
    """Create the scheduled deployments and run them from this process (embedded default; Ctrl-C stops)."""
    from flows.deploy import check_server, load_serve_config, serve_deployments

    if not config.is_file():
        _fail(f"{config}: no such deployments file (see infra/prefect/local.yaml)")
    specs = _run_user(load_serve_config, config)
    for spec in specs:
        when = spec["cron"] or (f"every {spec['interval']} s" if spec["interval"] else "on demand")
        typer.echo(f"deployment {spec['flow']}/{spec['name']}: {when}")
    if server:
        info = _run_user(check_server, server)
        typer.echo(f"Prefect server {info['api_url']} (version {info['version']})")
    if synthweb_root:
        from pipelines.synthweb import SynthWebServer

        with SynthWebServer(synthweb_root) as web:
            web.materialise_url_list()
            typer.echo(f"synthetic web served at {web.base_url}")
            _run_user(serve_deployments, config, limit=limit, server=server)
    else:
        _run_user(serve_deployments, config, limit=limit, server=server)


from flows.cli_versions import register as _register_versions  # noqa: E402 - versions, takedown, diff

_register_versions(app)


def main() -> None:  # console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
