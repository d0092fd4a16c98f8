"""Run report: one self-contained HTML page (plots as embedded PNG) and Markdown tables, built from artifacts on disk.

Reads only what earlier stages wrote (``BUILD/manifest.json``, ``AUDIT/report.json``, ``RUN/metrics.jsonl`` +
``RUN/config.json``, ``EVAL/eval.json``; local paths or ``s3://`` URIs) so a report can be rebuilt at any time,
from any machine, without Prefect or torch. A section whose input is missing or malformed (:class:`SectionError`)
becomes a one-line note naming the file and the reason; it never stops the rest of the report. Any other exception
is a bug in the report code and raises.

Entry points: :func:`render_report` (writes the HTML atomically) and :func:`markdown_tables` (tables for
``prefect.artifacts.create_markdown_artifact``). Same inputs => same bytes (no timestamps; PNGs without metadata).

Modules: :mod:`~flows.report.inputs` (read and validate the artifacts, table rows both renderers share),
:mod:`~flows.report.plots` (matplotlib charts as inline PNG), :mod:`~flows.report.html` (the page),
:mod:`~flows.report.markdown` (the artifact tables).
"""
from __future__ import annotations

from flows.report.html import render_report
from flows.report.inputs import SectionError, load_metrics
from flows.report.markdown import markdown_tables

__all__ = ["render_report", "markdown_tables", "load_metrics", "SectionError"]
