"""Beam pipeline options: DirectRunner by default, any other runner (Dataflow, Flink, Spark) by options alone.

The DirectRunner is asked for explicitly: Beam's default first tries the Prism runner, which downloads a binary
and fails offline. ``workers > 1`` selects the multi-processing direct runner. Everything in ``extra`` is passed
through untouched (``--runner=DataflowRunner --project=... --region=... --temp_location=gs://...``, ``--runner=
FlinkRunner --flink_master=...``, ``--runner=SparkRunner --spark_master_url=...``; see infra/beam/README.md).
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


def make_options(runner: str = "DirectRunner", workers: int = 1, extra: list[str] | None = None) -> PipelineOptions:
    args = list(extra or [])
    if not any(a.startswith("--runner") for a in args):
        args.append(f"--runner={runner}")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        else:
            args += ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return PipelineOptions(args)
