"""The demo: a synthetic web on 127.0.0.1 -> query list -> ``build_dataset`` (and, when asked, the end-to-end run).

Everything runs offline on the embedded default (a temporary local Prefect server), with CPU-sized settings.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def prepare_web(out: Path, n_pairs: int, seed: int) -> dict:
    """Generate the synthetic web and a query list for it (English unigrams + PMI bigrams of its captions)."""
    from pipelines.curate import querylist as QL
    from pipelines.synthweb import generate_web

    paths = generate_web(out / "web", n_pairs=n_pairs, seed=seed)
    ql_path = out / "querylist.parquet"
    if not ql_path.exists():
        captions = pq.read_table(paths["pairs_parquet"], columns=["caption"]).column("caption").to_pylist()
        qlist = QL.from_sources([("wordfreq", QL.wordfreq_unigrams(30_000)),
                                 ("bigram_pmi", QL.pmi_bigrams([c for c in captions if c], min_count=3))])
        QL.save(qlist, str(ql_path))
    return {**{k: str(v) for k, v in paths.items()}, "querylist": str(ql_path)}


DERIVED = ("build", "audit", "run", "eval")  # what the demo computes from its web (the web and query list stay)


def first_url(pairs_parquet: str) -> str:
    urls = pq.read_table(pairs_parquet, columns=["url"]).column("url")
    return str(urls[0]) if len(urls) else ""


def start_over_if_moved(out: Path, url_before: str, url_now: str) -> bool:
    """The web is served on a free port, which is part of every URL and uid: when it moved since an earlier demo
    in ``out``, that demo's build is of other URLs (its crawl refuses a different URL list), so the demo's derived
    outputs are removed and computed again. Returns whether it started over."""
    import shutil

    if url_before.split("/")[:3] == url_now.split("/")[:3] or not (out / "build").exists():
        return False
    for name in DERIVED:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "report.html").unlink(missing_ok=True)
    return True


def demo_build_config(out: Path, web: dict, *, t: float, samples_per_shard: int, seed: int):
    from flows.config import load_build_config

    return load_build_config({
        "inputs": [web["pairs_parquet"]], "querylist": web["querylist"], "out": str(out / "build"),
        "curate": {"t": t, "seed": seed},
        # The synthetic web is one host (127.0.0.1) that fails some URLs on purpose: per-host politeness and the
        # host circuit breaker are meant for the real web's many hosts, so they are opened up here.
        "crawl": {"allow_cidrs": ["127.0.0.1/32"], "timeout": 2.0, "max_download_seconds": 5.0, "retries": 0,
                  "thread_count": 32, "processes": 1, "image_size": 128, "number_sample_per_shard": 2000,
                  "per_host_connections": 32, "per_host_rps": None, "host_failure_limit": 1_000_000,
                  "max_retry_after_seconds": 0},
        # Flat drawn shapes of one concept sit within a few pHash bits of each other without being copies:
        # radius 2 still removes the web's planted near-duplicates (re-encodes, resizes) but not distinct drawings.
        "images": {"min_side": 24, "near_dup_radius": 2},
        "decontam": {"eval_sets": [f"synth:{web['root']}"]},
        "balance": {"seed": seed}, "shard": {"samples_per_shard": samples_per_shard, "seed": seed}})


def demo_e2e_config(out: Path, web: dict, *, t: float, samples_per_shard: int, seed: int, steps: int,
                    batch_size: int) -> dict:
    """The end_to_end flow's configuration for the demo (CPU-sized: a tiny CLIP for a few hundred steps)."""

    bcfg = demo_build_config(out, web, t=t, samples_per_shard=samples_per_shard, seed=seed)
    build = bcfg.to_dict()
    return {
        "out": str(out),
        "build": build,
        "train": {"model": "tiny", "steps": steps, "batch_size": batch_size, "seed": seed, "save_every": 100},
        "evaluate": {"linear_probe": True},
        # audit what the crawl fetched (before decontamination), so the report shows the overlap the build removed
        "audit": {"dataset": str(Path(bcfg.out) / "crawl" / "*.tar")},
    }
