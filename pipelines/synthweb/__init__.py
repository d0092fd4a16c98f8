"""The synthetic web: a deterministic, hostile little internet of drawn images and multilingual captions.

Used by tests, benchmarks and ``make demo`` to exercise curation and crawling end to end without the internet:

    paths = generate_web("web/", n_pairs=2000, seed=0)      # images, routes, raw URL list, held-out split
    with SynthWebServer("web/") as web:                     # real HTTP on 127.0.0.1, failure modes per URL
        web.materialise_url_list()                          # raw/pairs.{parquet,tsv} -> http://127.0.0.1:PORT/...
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines.synthweb.generator import (
    HELDOUT_TEMPLATES,
    PLACEHOLDER_BASE_URL,
    WebParams,
    generate_web,
    materialise_url_list,
)
from pipelines.synthweb.hostile import EXPECTED_CRAWL_REASON, FAILURE_MODES
from pipelines.synthweb.server import SynthWebServer, serve

__all__ = [
    "EXPECTED_CRAWL_REASON",
    "FAILURE_MODES",
    "HELDOUT_TEMPLATES",
    "PLACEHOLDER_BASE_URL",
    "SynthWebServer",
    "WebParams",
    "generate_web",
    "materialise_url_list",
    "serve",
    "synthweb_main",
]


def synthweb_main(out_dir: str | os.PathLike, n_pairs: int = 2000, seed: int = 0,
                  base_url: str | None = None, backgrounds: str = "flat") -> dict[str, Path]:
    """CLI entry (``clipline synthweb``): generate a web and return its paths (root, pairs_parquet, pairs_tsv,
    routes, heldout, classes, summary). Without ``base_url`` the URL list points at a placeholder host until a
    server rewrites it (:meth:`SynthWebServer.materialise_url_list`)."""
    return generate_web(out_dir, n_pairs=n_pairs, seed=seed, base_url=base_url, backgrounds=backgrounds)
