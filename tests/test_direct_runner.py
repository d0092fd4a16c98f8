"""pipelines.core.direct_runner: the local runner goes straight to Beam's FnApiRunner; it never tries Prism (whose
binary Beam's DirectRunner downloads from GitHub at run time) and leaves no temporary directory behind."""
from __future__ import annotations

import tempfile

import apache_beam as beam
import pytest
from apache_beam.runners.portability import prism_runner
from apache_beam.testing.util import assert_that, equal_to

from pipelines.core.beam import make_options, resolve_runner


def _prism_calls(monkeypatch) -> list:
    calls = []

    def refuse(self, pipeline, options):
        calls.append(pipeline)
        raise RuntimeError("Prism was tried")  # Beam's DirectRunner would swallow this and fall back

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    return calls


def _grouped_pipeline(options) -> None:
    with beam.Pipeline(options=options) as p:
        pairs = p | beam.Create([(i % 3, i) for i in range(30)])
        sums = pairs | beam.GroupByKey() | beam.MapTuple(lambda k, vs: (k, sum(vs)))
        assert_that(sums, equal_to([(0, sum(range(0, 30, 3))), (1, sum(range(1, 30, 3))), (2, sum(range(2, 30, 3)))]))


@pytest.mark.parametrize("name", ["direct", "DirectRunner", "apache_beam.runners.direct.direct_runner.DirectRunner"])
def test_every_name_of_the_direct_runner_is_ours(name):
    assert resolve_runner(name) == "pipelines.core.direct_runner.DirectRunner"


@pytest.mark.parametrize("workers", [1, 2])
def test_direct_runner_runs_without_trying_prism_and_leaves_no_temp_dir(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = _prism_calls(monkeypatch)
    _grouped_pipeline(make_options(workers=workers))
    assert calls == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_beams_own_direct_runner_would_try_prism(tmp_path, monkeypatch):
    """The control: the same pipeline on Beam's DirectRunner tries Prism first (so the test above can fail)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = _prism_calls(monkeypatch)
    _grouped_pipeline(PipelineOptions(["--runner=apache_beam.runners.direct.direct_runner.SwitchingDirectRunner",
                                       "--direct_running_mode=in_memory", "--direct_num_workers=1"]))
    assert len(calls) == 1
