"""What each stage of a build costs, reported as Beam metrics from wherever the stage runs.

A stage wraps its work in ``stage_clock("tokenize")``; every call adds to these distributions:

* ``stage_<name>_cpu_us``: CPU time of the calling thread (``time.thread_time``). Beam runs a
  bundle's fused steps in one thread, so the clock must stop before a step hands its outputs on
  (a generator's ``yield`` runs the downstream steps inside it): steps materialize their outputs
  inside the clock and yield them after it. Threads the stage starts itself are not counted;
  the build benchmark runs torch with one thread, so the forward is counted in full.
* ``stage_<name>_wall_us``: wall time of the same calls (busy time, summed over workers);
* ``stage_<name>_start_ms`` / ``_end_ms``: epoch milliseconds of each call's start and end, so
  ``StageCost.span_s`` is the stage's first start to its last end on any worker;
* ``stage_<name>_peak_mb``: the process's peak RSS (``VmHWM``) at the end of each call that
  raised it by 1 MB or more (only such calls), so ``StageCost.peak_mb`` says which stage set a
  worker's peak (with one thread per worker, as on the benchmark's Dask workers; threads
  sharing a process share its peak).

The launcher's own stages (listing the corpus, describing the model, committing) are timed
with the same clock into a plain dict (``LauncherClock``), since they run outside the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from apache_beam.metrics import Metrics

NAMESPACE = "dresd"  # every metric of the builder
PREFIX = "stage_"


def peak_rss_kb() -> int:
    """This process's peak RSS so far (``VmHWM``, kB), 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb() -> int:
    return peak_rss_kb() // 1024


@contextmanager
def stage_clock(stage: str) -> Iterator[None]:
    wall, cpu, peak = time.time(), time.thread_time(), peak_rss_kb()
    try:
        yield
    finally:
        end, used = time.time(), time.thread_time() - cpu
        # a rise of a page or two is the clock's own reads; a stage that sets a peak adds MBs
        if (now := peak_rss_kb()) >= peak + 1024:
            Metrics.distribution(NAMESPACE, f"{PREFIX}{stage}_peak_mb").update(now // 1024)
        Metrics.distribution(NAMESPACE, f"{PREFIX}{stage}_cpu_us").update(int(used * 1e6))
        Metrics.distribution(NAMESPACE, f"{PREFIX}{stage}_wall_us").update(
            int((end - wall) * 1e6))
        Metrics.distribution(NAMESPACE, f"{PREFIX}{stage}_start_ms").update(int(wall * 1000))
        Metrics.distribution(NAMESPACE, f"{PREFIX}{stage}_end_ms").update(int(end * 1000))


@dataclass(frozen=True)
class StageCost:
    """One stage of one run, summed over its calls on every worker."""

    stage: str
    calls: int
    cpu_s: float
    wall_s: float
    span_s: float
    peak_mb: int = 0  # the highest peak RSS a call of this stage raised its process to

    def as_dict(self) -> dict:
        return {"stage": self.stage, "calls": self.calls, "cpu_s": round(self.cpu_s, 3),
                "wall_s": round(self.wall_s, 3), "span_s": round(self.span_s, 3),
                "peak_mb": self.peak_mb}


def stage_costs(distributions: dict[str, dict]) -> dict[str, StageCost]:
    """The stages found in a run's merged distributions (``RunMetrics.distributions``)."""
    out = {}
    for name, cpu in distributions.items():
        if not (name.startswith(PREFIX) and name.endswith("_cpu_us")):
            continue
        stage = name[len(PREFIX):-len("_cpu_us")]
        wall = distributions.get(f"{PREFIX}{stage}_wall_us", {})
        start = distributions.get(f"{PREFIX}{stage}_start_ms")
        end = distributions.get(f"{PREFIX}{stage}_end_ms")
        span = (end["max"] - start["min"]) / 1000 if start and end else 0.0
        peak = distributions.get(f"{PREFIX}{stage}_peak_mb", {})
        out[stage] = StageCost(stage, cpu["count"], cpu["sum"] / 1e6,
                               wall.get("sum", 0) / 1e6, span, int(peak.get("max", 0)))
    return out


class LauncherClock:
    """Stages the launcher runs itself: {stage: {"cpu_s", "wall_s"}} in ``self.costs``."""

    def __init__(self):
        self.costs: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            cost = self.costs.setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
            cost["cpu_s"] += time.process_time() - cpu
            cost["wall_s"] += time.perf_counter() - wall
