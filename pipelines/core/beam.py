"""Beam pipeline options: a runner named by a short name or a class path, everything else by options alone.

``direct`` is :class:`pipelines.core.direct_runner.DirectRunner`: Beam's DirectRunner (and Beam's default runner)
first tries the Prism runner on every pipeline, downloading its binary from GitHub at run time (offline: a failed
download, a leaked temp directory and ~0.2 s of CPU per pipeline, then the FnApiRunner); ours goes to the FnApiRunner
directly. ``workers > 1`` selects the multi-processing direct runner. Everything in ``extra`` is passed
through untouched (``--project=... --region=... --temp_location=gs://...`` for Dataflow, ``--flink_master=...``,
``--dask_client_address=tcp://HOST:8786``; see infra/beam/README.md).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.errors import ConfigError

# Short names users type -> what Beam's --runner option takes.
RUNNERS = {
    "direct": "pipelines.core.direct_runner.DirectRunner",  # Beam's, without its attempt to download Prism
    "dask": "pipelines.core.dask_runner.DaskRunner",  # Beam's DaskRunner with its defects fixed (see there)
    "dataflow": "DataflowRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
}
_KNOWN = {v.rsplit(".", 1)[-1].lower(): v for v in RUNNERS.values()}
# Beam's own class path for Dask gives wrong results on multi-output and multi-branch pipelines: use ours.
# Beam's DirectRunner downloads and runs Prism when it can (see pipelines.core.direct_runner): use ours.
_ALIASES = {"apache_beam.runners.dask.dask_runner.DaskRunner": RUNNERS["dask"],
            "apache_beam.runners.direct.direct_runner.DirectRunner": RUNNERS["direct"],
            "apache_beam.runners.direct.direct_runner.SwitchingDirectRunner": RUNNERS["direct"]}


def resolve_runner(name: str) -> str:
    """'dask' / 'DaskRunner' / the full class path -> the value for ``--runner``; unknown names are a ConfigError."""
    key = (name or "direct").strip()
    if key.lower() in RUNNERS:
        return RUNNERS[key.lower()]
    if key in RUNNERS.values():
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    if key.lower() in _KNOWN:
        return _KNOWN[key.lower()]
    if key.lower().endswith("runner") and key.lower()[:-6] in RUNNERS:
        return RUNNERS[key.lower()[:-6]]
    raise ConfigError(f"runner {name!r} is not known; name one of {', '.join(RUNNERS)} "
                      f"(or a full class path such as {RUNNERS['dask']})")


def split_runner(extra: list[str] | None) -> tuple[str | None, list[str]]:
    """Take a ``--runner=X`` / ``--runner X`` out of a list of Beam arguments."""
    args, runner, i = list(extra or []), None, 0
    out = []
    while i < len(args):
        a = args[i]
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(args):
            runner, i = args[i + 1], i + 1
        else:
            out.append(a)
        i += 1
    return runner, out


def make_options(runner: str = "direct", workers: int = 1, extra: list[str] | None = None) -> PipelineOptions:
    from_args, args = split_runner(extra)
    runner = resolve_runner(from_args or runner)
    args.append(f"--runner={runner}")
    if runner == RUNNERS["direct"] and not any(a.startswith("--direct_running_mode") for a in args):
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        else:
            args += ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return PipelineOptions(args)


# ------------------------------------------------------------------------------------ multi-output, runner-neutral

MAIN = "__main__"


class _AsPairs(beam.DoFn):
    """Runs a DoFn (or a plain function) and emits every output as a (tag, value) pair on ONE output.

    Beam's DaskRunner (2.77) sends all outputs of a multi-output ParDo into one bag (its ``OneReceiver``), so
    ``.with_outputs(...)`` silently mixes PCollections there. Pairs + per-tag filters mean the same on every runner.
    """

    def __init__(self, fn):
        self.fn = fn

    def setup(self):
        if isinstance(self.fn, beam.DoFn):
            self.fn.setup()

    def teardown(self):
        if isinstance(self.fn, beam.DoFn):
            self.fn.teardown()

    def process(self, element, *args, **kwargs):
        outs = self.fn.process(element, *args, **kwargs) if isinstance(self.fn, beam.DoFn) \
            else self.fn(element, *args, **kwargs)
        for out in outs or ():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield out.tag, out.value
            else:
                yield MAIN, out


class Outputs(dict):
    """Tagged PCollections, by item (``out["rejected"]``) or attribute (``out.rejected``), like Beam's
    DoOutputsTuple."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _pick(pair, tag):
    return [pair[1]] if pair[0] == tag else []


class MultiOutput(beam.PTransform):
    """``pcoll | MultiOutput(fn, tags, main="ok", args=...)`` instead of ``beam.ParDo(fn, ...).with_outputs(...)``:
    ``fn`` (a DoFn or a function returning an iterable) yields plain values for the main output and
    ``TaggedOutput(tag, value)`` for the others; returns :class:`Outputs` keyed by ``main`` and each tag."""

    def __init__(self, fn, tags, main: str = "main", args=(), kwargs=None):
        super().__init__()
        self.fn, self.tags, self.main, self.args, self.kwargs = fn, tuple(tags), main, tuple(args), dict(kwargs or {})

    def expand(self, pcoll):
        pairs = pcoll | "Tagged" >> beam.ParDo(_AsPairs(self.fn), *self.args, **self.kwargs)
        out = Outputs()
        out[self.main] = pairs | f"Out[{self.main}]" >> beam.FlatMap(_pick, MAIN)
        for tag in self.tags:
            out[tag] = pairs | f"Out[{tag}]" >> beam.FlatMap(_pick, tag)
        return out
