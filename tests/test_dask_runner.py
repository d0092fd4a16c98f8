"""Beam stages on a real dask.distributed cluster (scheduler + 2 worker processes on 127.0.0.1) through
pipelines.core.dask_runner: the same bytes as the DirectRunner, with inputs, outputs and temp files on S3 (moto)."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage
from pipelines.core.beam import make_options, resolve_runner
from pipelines.curate.stage import run_curate
from pipelines.curate.steps import CurateParams


def dask_args(address: str) -> list[str]:
    return [f"--dask_client_address={address}"]


def _tree(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every output file under a local dir or s3:// prefix (markers excluded)."""
    out = {}
    for uri in storage.list_prefix(root):
        rel = uri[len(root):].lstrip("/")
        if rel.endswith(".parquet"):
            out[rel] = storage.read_bytes(uri)
    return out


class _Tags(beam.DoFn):
    def process(self, x):
        yield x
        yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x * 10)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        yield WindowedValue(-1, 0, [GlobalWindow()])


def test_runner_names():
    assert resolve_runner("dask") == "pipelines.core.dask_runner.DaskRunner"
    assert resolve_runner("DaskRunner") == resolve_runner("dask")
    # Beam's own class path is routed to the fixed runner (Beam's mixes outputs; see pipelines/core/dask_runner.py)
    assert resolve_runner("apache_beam.runners.dask.dask_runner.DaskRunner") == resolve_runner("dask")
    assert resolve_runner("direct") == "pipelines.core.direct_runner.DirectRunner"


def test_tagged_outputs_finish_bundle_and_every_branch_run_on_dask(dask_cluster, s3_bucket):
    """The three DaskRunner defects the fixed runner exists for: each tagged output is its own PCollection,
    finish_bundle outputs are kept (once per bundle), and a branch that feeds no later step still runs."""
    out = f"{s3_bucket}/branches"
    with beam.Pipeline(options=make_options("dask", extra=dask_args(dask_cluster))) as p:
        res = p | beam.Create(list(range(10))) | beam.ParDo(_Tags()).with_outputs("odd", "even", main="main")
        _ = (res.odd | "ListOdd" >> beam.combiners.ToList()
             | "WriteOdd" >> beam.Map(lambda xs: storage.write_json(f"{out}/odd.json", sorted(xs))))
        _ = (res.even | "ListEven" >> beam.combiners.ToList()
             | "WriteEven" >> beam.Map(lambda xs: storage.write_json(f"{out}/even.json", sorted(xs))))
        _ = (res.main | "ListMain" >> beam.combiners.ToList()
             | "WriteMain" >> beam.Map(lambda xs: storage.write_json(f"{out}/main.json", sorted(xs))))
    assert storage.read_json(f"{out}/odd.json") == [10, 30, 50, 70, 90]
    assert storage.read_json(f"{out}/even.json") == [0, 20, 40, 60, 80]
    main = storage.read_json(f"{out}/main.json")
    assert [x for x in main if x >= 0] == list(range(10))
    n_bundles = main.count(-1)
    assert 1 <= n_bundles <= 10  # one finish_bundle output per bundle, never leaked into other bundles


@pytest.fixture(scope="module")
def raw_inputs(tmp_path_factory):
    import random

    rng = random.Random(7)
    words = "red blue green cat dog car tree house river mountain small big old new the a on in".split()
    d = tmp_path_factory.mktemp("dask-inputs")
    for f in range(3):
        n = 6000
        pq.write_table(pa.table({
            "url": [f"http://h{i % 7}.example.com/{rng.randint(0, 15000)}.jpg" for i in range(n)],
            "caption": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(n)]}),
            d / f"part{f}.parquet")
    (d / "ql.txt").write_text("\n".join(words[:14]) + "\n")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("balance", [{"t": 300.0}, {"t": None, "target_size": 4000}])
def test_curate_on_dask_with_s3_is_byte_identical_to_direct(raw_inputs, dask_cluster, s3_bucket, tmp_path, balance):
    for p in raw_inputs.iterdir():
        storage.write_bytes_atomic(f"{s3_bucket}/raw/{p.name}", p.read_bytes())
    params = CurateParams(langs=(), dedup="url_caption", batch_rows=1500, **balance)
    local = str(tmp_path / "direct")
    ref = run_curate([str(raw_inputs / "part*.parquet")], str(raw_inputs / "ql.txt"), local, params)
    remote = f"{s3_bucket}/curated"  # candidates, rejected rows AND the spill files (_tmp) live on S3
    got = run_curate([f"{s3_bucket}/raw/part*.parquet"], f"{s3_bucket}/raw/ql.txt", remote, params,
                     runner="dask", beam_args=dask_args(dask_cluster))
    assert got["runner"]["runner"] == "dask"
    assert (got["input_rows"], got["kept"], got["rejected"]) == (ref["input_rows"], ref["kept"], ref["rejected"])
    assert 0 < ref["kept"] < ref["input_rows"]
    local_files, remote_files = _tree(local), _tree(remote)
    assert sorted(local_files) == sorted(remote_files) and len(local_files) > 10
    for name, data in local_files.items():
        if not name.startswith("rejected/"):
            assert data == remote_files[name], name  # candidates and entry counts: the same bytes
            continue
        # rejected rows name their input file in `source`: only the location of the inputs differs
        a, b = pq.read_table(pa.BufferReader(data)), pq.read_table(pa.BufferReader(remote_files[name]))
        assert a.drop(["source"]).equals(b.drop(["source"]))
        assert [s.replace(str(raw_inputs), "RAW") for s in a.column("source").to_pylist()] == \
               [s.replace(f"{s3_bucket}/raw", "RAW") for s in b.column("source").to_pylist()]
    assert not [u for u in storage.list_prefix(remote) if "/_tmp/" in u]  # spill files cleaned up


@pytest.mark.slow
def test_whole_build_on_dask_with_s3_matches_the_direct_build(synth_build, synth_web_small, dask_cluster, s3_bucket,
                                                              prefect_server):
    """Every Beam stage of a build (curate, images, decontam, balance, shard) on the 2-worker Dask cluster, all
    outputs and intermediates on S3: same shards (bytes), same candidates and kept set (bytes), same pool rows, same
    funnel as the DirectRunner build of the session."""
    from flows.build import build_dataset
    from tests.conftest import synth_build_config

    ref_dir, ref_summary = synth_build
    out = f"{s3_bucket}/dask-build"
    synth_web_small["server"].reset_flaky()
    summary = build_dataset(synth_build_config(synth_web_small, out, runner="dask",
                                               beam_args=dask_args(dask_cluster)))
    assert summary["funnel"] == ref_summary["funnel"]
    for sub in ("shards", "curate/candidates", "balance"):
        ref = {k: v for k, v in _tree(str(ref_dir / sub)).items()}
        got = _tree(f"{out}/{sub}")
        assert ref and got == ref, sub
    for name in ("shards/sizes.json",):
        assert storage.read_bytes(f"{out}/{name}") == (ref_dir / name).read_bytes()
    # The pool names where each image lives: the crawl tar (local path vs s3:// URI) and its source; equal once that
    # location is set aside, offsets included (the crawl writes each shard in key order: pipelines/crawl/canonical.py)
    ref_pool = pa.concat_tables([pq.read_table(p) for p in sorted((ref_dir / "pool").glob("samples-*.parquet"))])
    got_pool = pa.concat_tables([storage.read_table(u) for u in sorted(storage.list_prefix(f"{out}/pool"))
                                 if u.endswith(".parquet")])
    moved = ["crawl_tar", "source"]
    ref_pool, got_pool = ref_pool.drop(moved).sort_by("uid"), got_pool.drop(moved).sort_by("uid")
    differing = [c for c in ref_pool.column_names if not ref_pool.column(c).equals(got_pool.column(c))]
    assert not differing, differing
    assert "sha256" in ref_pool.column_names and ref_pool.num_rows == got_pool.num_rows > 0
