"""Beam pipeline options: a runner named by a short name or a class path, everything else by options alone.

The DirectRunner is asked for explicitly: Beam's default first tries the Prism runner, which downloads a binary
and fails offline. ``workers > 1`` selects the multi-processing direct runner. Everything in ``extra`` is passed
through untouched (``--project=... --region=... --temp_location=gs://...`` for Dataflow, ``--flink_master=...``,
``--dask_client_address=tcp://HOST:8786``; see infra/beam/README.md).
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.errors import ConfigError

# Short names users type -> what Beam's --runner option takes.
RUNNERS = {
    "direct": "DirectRunner",
    "dask": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "dataflow": "DataflowRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
}
_KNOWN = {v.rsplit(".", 1)[-1].lower(): v for v in RUNNERS.values()}


def resolve_runner(name: str) -> str:
    """'dask' / 'DaskRunner' / the full class path -> the value for ``--runner``; unknown names are a ConfigError."""
    key = (name or "direct").strip()
    if key.lower() in RUNNERS:
        return RUNNERS[key.lower()]
    if key in RUNNERS.values():
        return key
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
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        else:
            args += ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return PipelineOptions(args)
