"""Beam pipeline options for the builder's pipelines."""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

# Beam refuses the short name "DaskRunner", and its DaskRunner as shipped drops outputs these
# pipelines rely on (pipelines.dask_runner): both names select the fixed subclass.
DASK_RUNNER = "pipelines.dask_runner.DaskRunner"
_DASK_NAMES = ("DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner")


def runner_name(beam_args: Sequence[str] | None) -> str:
    """The ``--runner`` value among Beam arguments ('' when none is given)."""
    args = list(beam_args or [])
    runner = ""
    for i, a in enumerate(args):
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(args):
            runner = args[i + 1]
    return runner


def pipeline_options(beam_args: Sequence[str] | None) -> PipelineOptions:
    """Beam options as given; without ``--runner``, the DirectRunner's local FnApiRunner.

    Named explicitly because the DirectRunner first tries to download and start the Prism
    runner, which a machine without network access waits on and then abandons. Every other
    runner (Dataflow, Flink, Spark, Prism) is chosen with ``--runner`` and its usual options;
    ``--runner=DaskRunner`` selects ``pipelines.dask_runner.DaskRunner``.
    """
    args = list(beam_args or [])
    runner = runner_name(args)
    if not runner:
        args.append("--runner=FnApiRunner")
    elif runner in _DASK_NAMES:
        args = [a for i, a in enumerate(args) if not (
            a.startswith("--runner=") or a == "--runner"
            or (i > 0 and args[i - 1] == "--runner"))]
        args.append(f"--runner={DASK_RUNNER}")
    return PipelineOptions(args)
