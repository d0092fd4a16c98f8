"""Beam's DirectRunner without its attempt to download and run Prism.

Beam 2.77's ``DirectRunner`` (``SwitchingDirectRunner``) first tries the Prism runner on every pipeline: it walks
the pipeline (a ``userstate.get_dofn_specs`` call per DoFn), starts a worker pool on localhost, makes a
``beam-temp*`` directory it never removes, and **downloads the Prism binary from GitHub**. Offline the download
fails and the pipeline falls back to the FnApiRunner, ~0.2 s of CPU (measured on a small pipeline) and one leaked
directory per pipeline later;
online the pipeline runs on a binary fetched at run time, in another process, instead of the runner that was asked
for. This runner does what the DirectRunner does after that attempt: the FnApiRunner (in_memory or
multi_processing, from ``--direct_running_mode`` / ``--direct_num_workers``) with the pipeline's options in its
provision info, or Beam's bundle-based DirectRunner for what the FnApiRunner cannot run (streaming sources, test
streams, real-time timers). ``pipelines.core.beam.make_options`` selects it for ``direct`` / ``DirectRunner``.
"""
from __future__ import annotations

import itertools

import apache_beam as beam
from apache_beam.internal.util import ArgumentPlaceholder
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner, SwitchingDirectRunner
from apache_beam.transforms import userstate
from apache_beam.transforms.core import CombineValuesDoFn
from apache_beam.transforms.timeutil import TimeDomain


class _FnApiSupport(PipelineVisitor):
    """The checks of the DirectRunner's own ``_FnApiRunnerSupportVisitor`` (Beam 2.77), without the Prism ones."""

    def __init__(self):
        self.supported = True

    def enter_composite_transform(self, applied_ptransform):
        from apache_beam.io.gcp.pubsub import ReadFromPubSub, WriteToPubSub

        if isinstance(applied_ptransform.transform, (ReadFromPubSub, WriteToPubSub)):
            self.supported = False

    def visit_transform(self, applied_ptransform):
        from apache_beam.testing.test_stream import TestStream

        transform = applied_ptransform.transform
        if isinstance(transform, TestStream):
            self.supported = False
        if isinstance(transform, beam.ParDo):
            dofn = transform.dofn
            if isinstance(dofn, CombineValuesDoFn):
                args, kwargs = transform.raw_side_inputs
                if any(isinstance(a, ArgumentPlaceholder) for a in itertools.chain(args, kwargs.values())):
                    self.supported = False
            if userstate.is_stateful_dofn(dofn):
                _, timer_specs = userstate.get_dofn_specs(dofn)
                if any(t.time_domain == TimeDomain.REAL_TIME for t in timer_specs):
                    self.supported = False


class DirectRunner(SwitchingDirectRunner):
    """Runs a pipeline on this machine: Beam's FnApiRunner, never Prism (see the module's docstring)."""

    def run_pipeline(self, pipeline, options):
        support = _FnApiSupport()
        pipeline.visit(support)
        if not support.supported:
            return BundleBasedDirectRunner().run_pipeline(pipeline, options)
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)
