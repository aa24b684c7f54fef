"""pipelines.stage_clock, read back from a real Beam run: each stage's calls and CPU, and the
peak RSS a stage raised its process to (the figure that says which stage set a worker's peak)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh process, so that its peak RSS is its imports' and the allocation below must raise it.
SCRIPT = r"""
import json

import apache_beam as beam
import numpy as np

from pipelines.build import run_pipeline
from pipelines.stage_clock import peak_rss_mb, stage_clock


class Grow(beam.DoFn):
    def process(self, mib):
        with stage_clock("grow"):
            block = np.ones(mib * 2**20 // 8)  # every page touched: resident
            total = float(block.sum())
        with stage_clock("idle"):  # the block is still held: no new peak
            total += 1
        yield total


p = beam.Pipeline(runner="DirectRunner")
_ = p | beam.Create([512]) | beam.ParDo(Grow())
stages = {k: v.as_dict() for k, v in run_pipeline(p).stages.items()}
print("RESULT", json.dumps({"stages": stages, "peak_mb": peak_rss_mb()}))
"""


def test_a_stage_that_raises_the_peak_says_so():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PATH": "", "OMP_NUM_THREADS": "1",
                                                     "PYTHONPATH": str(ROOT)})
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[7:])
    grow, idle = result["stages"]["grow"], result["stages"]["idle"]
    assert grow["calls"] == 1 and idle["calls"] == 1
    assert 512 <= grow["peak_mb"] <= result["peak_mb"]
    assert idle["peak_mb"] == 0
