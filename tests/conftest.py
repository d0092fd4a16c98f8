"""Shared test fixtures: ../shared/data location, the S3 endpoint (moto server), quiet third-party noise."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Prefect configures its logging once per process, on first import, bound to the sys.stderr of that moment. Imported
# here, that is the session's stream; imported first inside a CLI test (typer's CliRunner swaps sys.stderr for a
# stream it closes afterwards), every later flow run of the process would log to a closed file.
import prefect.main  # noqa: E402,F401 - "import prefect" alone defers the set-up

from tests.s3_fixtures import *  # noqa: E402,F401,F403 - session-scoped moto server fixtures
from tests.dask_fixtures import dask_cluster  # noqa: E402,F401 - a real 2-worker dask cluster
from tests.pg_fixtures import *  # noqa: E402,F401,F403 - PostgreSQL + Prefect server fixtures

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("CLIPLINE_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


class _DropNoise(logging.Filter):
    def filter(self, record):
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropNoise())


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's real temporary server (started once per test session: it takes ~10-20 s)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        # The harness sets the URL for this process only: exported, the CLI processes that tests start report to
        # this server too, instead of each starting a temporary server of its own (~10-20 s each).
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


@pytest.fixture(scope="session")
def synth_web_small(tmp_path_factory):
    """A small synthetic web served on 127.0.0.1 for the whole session, with a query list for it."""
    import pyarrow.parquet as pq

    from pipelines.curate import querylist as QL
    from pipelines.synthweb import SynthWebServer, generate_web

    root = tmp_path_factory.mktemp("synthweb")
    paths = generate_web(root / "web", n_pairs=260, seed=3)
    with SynthWebServer(root / "web") as server:
        server.materialise_url_list()
        captions = pq.read_table(paths["pairs_parquet"], columns=["caption"]).column("caption").to_pylist()
        qlist = QL.from_sources([("wordfreq", QL.wordfreq_unigrams(20_000)),
                                 ("bigram_pmi", QL.pmi_bigrams([c for c in captions if c], min_count=3))])
        QL.save(qlist, str(root / "ql.parquet"))
        yield {"root": root / "web", "pairs": paths["pairs_parquet"], "querylist": root / "ql.parquet",
               "server": server}


# The synthetic web is ONE host (127.0.0.1) whose hostile URLs fail on purpose: per-host politeness and the
# host circuit breaker (tested on their own in tests/test_crawl_politeness.py and test_crawl_hostile.py) would
# pause the only host and make the outcome depend on timing, so they are opened up for these builds.
SINGLE_HOST_WEB = {"per_host_connections": 16, "per_host_rps": None, "host_failure_limit": 1_000_000,
                   "max_retry_after_seconds": 0}


def synth_build_config(web, out, **kw):
    """The build configuration the flow tests share (a small, fast crawl of the session's synthetic web)."""
    from flows.config import load_build_config

    t = kw.pop("t", 10_000)
    return load_build_config({
        "inputs": [str(web["pairs"])], "querylist": str(web["querylist"]), "out": str(out),
        "curate": {"t": t, "langs": []},
        "crawl": {"allow_cidrs": ["127.0.0.1/32"], "timeout": 1.5, "max_download_seconds": 3.0, "retries": 0,
                  "thread_count": 16, "image_size": 96, **SINGLE_HOST_WEB},
        "images": {"min_side": 16}, "decontam": {"eval_sets": [f"synth:{web['root']}"]},
        "shard": {"samples_per_shard": 40}}, kw)


@pytest.fixture(scope="session")
def synth_build(prefect_server, synth_web_small, tmp_path_factory):
    """One build of the session's synthetic web (with decontamination against its held-out split)."""
    from flows.build import build_dataset

    out = tmp_path_factory.mktemp("build")
    synth_web_small["server"].reset_flaky()  # every build under test meets the web as a fresh crawler would
    summary = build_dataset(synth_build_config(synth_web_small, out))
    return out, summary


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``-n N --dist loadgroup`` (``make test``): a file's tests stay on one worker (its module fixtures are
    made once), the files with a test that uses the session's synthetic build (``synth_build``) stay together so
    that build is made once, and the long groups are handed out first (the synthetic build's, then the files
    marked slow) so that no worker starts one near the end. A test's own xdist_group mark wins. Without xdist,
    nothing changes."""
    if not config.getoption("loadgroup", False):
        return
    shared = {item.path for item in items if "synth_build" in getattr(item, "fixturenames", ())}
    rank: dict[str, int] = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group("synth_build" if item.path in shared else item.path.name))
        group = _group(item)
        slow = 0 if group == "synth_build" else 1 if item.get_closest_marker("slow") else 2
        rank[group] = min(rank.get(group, 2), slow)
    items.sort(key=lambda item: rank[_group(item)])  # a stable sort: the order within a file is kept


def _group(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
