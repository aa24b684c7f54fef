"""Beam pipeline options for the builder's pipelines."""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions


def pipeline_options(beam_args: Sequence[str] | None) -> PipelineOptions:
    """Beam options as given; without ``--runner``, the DirectRunner's local FnApiRunner.

    Named explicitly because the DirectRunner first tries to download and start the Prism
    runner, which a machine without network access waits on and then abandons. Every other
    runner (Dataflow, Flink, Spark, Prism) is chosen with ``--runner`` and its usual options.
    """
    args = list(beam_args or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=FnApiRunner")
    return PipelineOptions(args)
